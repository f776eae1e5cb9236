//! Plan and render at fleet scale: 500 FoundationModels on every one of 3 Cells, with 100
//! ProvisionedThroughputs — the CPU time of one full plan, and of rendering every pool's objects
//! (what each reconcile and `mantle render` do). Five timed rounds after a warm-up; the median
//! and the range are printed.
//!
//! `cargo bench -p mantle-operator --bench plan`

use std::time::Instant;

use mantle_crds::{Cell, FoundationModel, ProvisionedThroughput};
use mantle_operator::render::RenderOptions;
use mantle_operator::{Desired, Observed, plan, render};

fn fleet(models: usize, cells: usize, reservations: usize) -> Desired {
    let cell = |i: usize| -> Cell {
        serde_norway::from_str(&format!(
            "apiVersion: mantle.dev/v1alpha1\nkind: Cell\nmetadata: {{name: cell-{i}, namespace: models}}\nspec:\n  region: r\n  nodeSelector: {{mantle.dev/cell: cell-{i}}}\n  capacity: {{gpus: 64}}\n"
        ))
        .unwrap()
    };
    let model = |i: usize| -> FoundationModel {
        serde_norway::from_str(&format!(
            "apiVersion: mantle.dev/v1alpha1\nkind: FoundationModel\nmetadata: {{name: model-{i}, namespace: models, uid: u-{i}}}\nspec:\n  modelId: acme.model-{i}-v1:0\n  provider: Acme\n  modality: TEXT\n  source: {{uri: 's3://models/m{i}.gguf', format: gguf, sha256: {:064x}}}\n  contextLength: 8192\n  resources: {{gpus: 1, memory: 32Gi}}\n  replicas: {{min: 2, max: 8}}\n  provisioning: {{tokensPerMinutePerUnit: 100000}}\n",
            i
        ))
        .unwrap()
    };
    let reservation = |i: usize| -> ProvisionedThroughput {
        serde_norway::from_str(&format!(
            "apiVersion: mantle.dev/v1alpha1\nkind: ProvisionedThroughput\nmetadata: {{name: pt-{i}, namespace: models}}\nspec:\n  modelId: acme.model-{}-v1:0\n  modelUnits: 3\n  commitment: ONE_MONTH\n  tenant: tenant-{i}\n",
            i * 5
        ))
        .unwrap()
    };
    Desired {
        models: (0..models).map(model).collect(),
        provisioned: (0..reservations).map(reservation).collect(),
        cells: (0..cells).map(cell).collect(),
    }
}

fn median_and_range(mut samples: Vec<f64>) -> (f64, f64, f64) {
    samples.sort_by(f64::total_cmp);
    (samples[samples.len() / 2], samples[0], samples[samples.len() - 1])
}

fn main() {
    let desired = fleet(500, 3, 100);
    let options = RenderOptions::default();
    let observed = Observed::default();
    // Warm-up.
    let p = plan(&desired, &observed);
    let objects = render(&desired, &p, &options);
    let (mut planning, mut rendering) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        let t = Instant::now();
        let p = plan(&desired, &observed);
        planning.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        let o = render(&desired, &p, &options);
        rendering.push(t.elapsed().as_secs_f64() * 1e3);
        assert_eq!(o.len(), objects.len());
    }
    let yaml = mantle_operator::render::to_yaml(&objects).unwrap();
    let (pm, plo, phi) = median_and_range(planning);
    let (rm, rlo, rhi) = median_and_range(rendering);
    println!(
        "fleet: 500 models × 3 Cells, 100 reservations → {} pools, {} objects ({:.1} MiB of YAML)",
        p.pools.len(),
        objects.len(),
        yaml.len() as f64 / (1 << 20) as f64
    );
    println!("plan:   median {pm:.2} ms (range {plo:.2}–{phi:.2}) over 5 rounds");
    println!("render: median {rm:.2} ms (range {rlo:.2}–{rhi:.2}) over 5 rounds");
}
