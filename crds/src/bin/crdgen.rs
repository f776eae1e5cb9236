//! Writes the CRD manifests generated from the types into `crds/manifests/` and the chart.
fn main() -> std::io::Result<()> {
    // The directory at run time (cargo sets it): a binary built in another checkout that shares
    // the target directory would otherwise write into that checkout.
    let crate_dir = std::path::PathBuf::from(
        std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").into()),
    );
    let root = crate_dir.parent().unwrap_or(&crate_dir);
    for path in mantle_crds::write_generated(root)? {
        println!("wrote {}", path.display());
    }
    Ok(())
}
