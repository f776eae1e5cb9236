//! The manifests directory `mantle dev` follows: read file by file, so one broken file is
//! reported (file, field, reason) and ignored — its last good version, if any, stays in force —
//! while the rest keeps running; read again every second, and a change is noticed by content.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use mantle_crds::{Manifest, parse_manifests};
use mantle_operator::Desired;

/// One file's state.
struct File {
    /// The text last read (a change is a change of text).
    text: String,
    /// The manifests of the last version that parsed and validated.
    good: Vec<Manifest>,
}

/// The directory and what each of its files last held.
pub struct ManifestDir {
    dir: PathBuf,
    files: BTreeMap<PathBuf, File>,
}

impl ManifestDir {
    pub fn new(dir: &Path) -> Self {
        ManifestDir { dir: dir.to_path_buf(), files: BTreeMap::new() }
    }

    /// Reads the directory again; returns whether anything changed, and each problem met (a file
    /// that does not parse or validate) as `file: reason`.
    pub fn refresh(&mut self) -> std::io::Result<(bool, Vec<String>)> {
        let paths = mantle_crds::manifest_files(&self.dir)?;
        let mut changed = false;
        let mut problems = Vec::new();
        let gone: Vec<PathBuf> = self.files.keys().filter(|p| !paths.contains(p)).cloned().collect();
        for path in gone {
            self.files.remove(&path);
            changed = true;
        }
        for path in paths {
            // A file being written may be read half-written: it fails now and is read again.
            let Ok(text) = std::fs::read_to_string(&path) else { continue };
            if self.files.get(&path).is_some_and(|f| f.text == text) {
                continue;
            }
            changed = true;
            let parsed =
                parse_manifests(&text, &path.display().to_string()).map_err(|e| e.to_string()).and_then(|ms| {
                    for m in &ms {
                        m.validate().map_err(|e| format!("{} {}: {e}", m.kind(), m.name()))?;
                    }
                    Ok(ms)
                });
            let previous = self.files.remove(&path).map(|f| f.good).unwrap_or_default();
            let good = match parsed {
                Ok(good) => good,
                Err(reason) => {
                    problems.push(format!("{}: {reason}", path.display()));
                    previous
                }
            };
            self.files.insert(path, File { text, good });
        }
        Ok((changed, problems))
    }

    /// The BatchJobs of the files that parsed.
    pub fn batch_jobs(&self) -> Vec<mantle_crds::BatchJob> {
        self.files
            .values()
            .flat_map(|f| f.good.iter())
            .filter_map(|m| match m {
                Manifest::BatchJob(j) => Some(j.clone()),
                _ => None,
            })
            .collect()
    }

    /// What the files that parsed hold.
    pub fn desired(&self) -> Desired {
        Desired::from_manifests(self.files.values().flat_map(|f| f.good.iter().cloned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MODEL: &str = "apiVersion: mantle.dev/v1alpha1\nkind: FoundationModel\nmetadata: {name: m}\nspec:\n  modelId: a.b-v1:0\n  provider: p\n  modality: TEXT\n  source: {uri: 's3://b/m.gguf', format: gguf}\n  contextLength: 2048\n";

    #[test]
    fn a_broken_file_is_reported_and_its_last_good_version_kept() {
        let dir = std::env::temp_dir().join(format!("mantle-dev-manifests-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("m.yaml"), MODEL).unwrap();
        let mut m = ManifestDir::new(&dir);
        assert_eq!(m.refresh().unwrap(), (true, vec![]));
        assert_eq!(m.desired().models.len(), 1);
        assert_eq!(m.refresh().unwrap(), (false, vec![]), "nothing changed");
        // A typo: reported with the file and the field; the model keeps running.
        std::fs::write(dir.join("m.yaml"), MODEL.replace("contextLength: 2048", "contextLength: -1")).unwrap();
        let (changed, problems) = m.refresh().unwrap();
        assert!(
            changed && problems.len() == 1 && problems[0].contains("m.yaml") && problems[0].contains("contextLength"),
            "{problems:?}"
        );
        assert_eq!(m.desired().models[0].spec.context_length, 2048);
        // A file that is not YAML at all, beside: reported, the rest unaffected.
        std::fs::write(dir.join("junk.yaml"), "kind: [").unwrap();
        let (_, problems) = m.refresh().unwrap();
        assert!(problems.iter().any(|p| p.contains("junk.yaml")), "{problems:?}");
        assert_eq!(m.desired().models.len(), 1);
        // Deleted: gone.
        std::fs::remove_file(dir.join("m.yaml")).unwrap();
        assert!(m.refresh().unwrap().0);
        assert!(m.desired().models.is_empty());
        std::fs::remove_dir_all(dir).ok();
    }
}
