//! Writes the CRD manifests generated from the types into `crds/manifests/` and the chart.
fn main() -> std::io::Result<()> {
    let crate_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let root = crate_dir.parent().unwrap_or(crate_dir);
    for path in mantle_crds::write_generated(root)? {
        println!("wrote {}", path.display());
    }
    Ok(())
}
