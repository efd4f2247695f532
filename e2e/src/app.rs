//! Finding the binaries the end-to-end tests start inside namespaces: the
//! `mesh-app` test application (clients and servers on both ends of the
//! captured traffic) and the mesh's own binaries such as `ztunnel`.

use std::path::{Path, PathBuf};

/// Overrides the directory searched first (for binaries built elsewhere).
pub const BIN_DIR_ENV: &str = "MESH_BIN_DIR";

/// Errors of locating binaries.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("binary {name:?} not found (looked in {searched}); build it first, e.g. `cargo build -p {package} --bin {name}`")]
    NotFound {
        name: String,
        package: String,
        searched: String,
    },
}

/// Path of the `mesh-app` binary.
pub fn mesh_app() -> Result<PathBuf, AppError> {
    binary("mesh-app")
}

/// Path of the `ztunnel` binary.
pub fn ztunnel() -> Result<PathBuf, AppError> {
    binary("ztunnel")
}

/// Locates a binary of the workspace: `$MESH_BIN_DIR/NAME`, then the
/// directory of the running executable and its parent (a test binary runs
/// from `target/<profile>/deps/`, the binaries sit in `target/<profile>/`).
/// Inside the e2e crate's own tests `env!("CARGO_BIN_EXE_mesh-app")` is the
/// exact answer; this function serves tests of other crates too.
pub fn binary(name: &str) -> Result<PathBuf, AppError> {
    let dirs = candidate_dirs(
        std::env::var_os(BIN_DIR_ENV).map(PathBuf::from),
        std::env::current_exe().ok(),
    );
    find_in(name, &dirs).ok_or_else(|| AppError::NotFound {
        name: name.to_string(),
        package: package_of(name).to_string(),
        searched: dirs
            .iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
    })
}

fn candidate_dirs(env_dir: Option<PathBuf>, exe: Option<PathBuf>) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    dirs.extend(env_dir);
    if let Some(dir) = exe.as_deref().and_then(Path::parent) {
        dirs.push(dir.to_path_buf());
        if dir.file_name().is_some_and(|f| f == "deps") {
            dirs.extend(dir.parent().map(Path::to_path_buf));
        }
    }
    dirs
}

fn find_in(name: &str, dirs: &[PathBuf]) -> Option<PathBuf> {
    dirs.iter().map(|d| d.join(name)).find(|p| p.is_file())
}

fn package_of(name: &str) -> &str {
    match name {
        "mesh-app" | "mesh-bench" | "cp-bench" | "mesh-demo" | "sample-app" => "e2e",
        "mesh-cni" => "cni-plugin",
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_executables_look_in_the_profile_dir() {
        let dirs = candidate_dirs(
            Some(PathBuf::from("/opt/bin")),
            Some(PathBuf::from("/t/target/debug/deps/topology-123")),
        );
        assert_eq!(
            dirs,
            [
                PathBuf::from("/opt/bin"),
                PathBuf::from("/t/target/debug/deps"),
                PathBuf::from("/t/target/debug"),
            ]
        );
    }

    #[test]
    fn finds_existing_files_only() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tool"), b"").unwrap();
        let dirs = [PathBuf::from("/nonexistent"), dir.path().to_path_buf()];
        assert_eq!(find_in("tool", &dirs), Some(dir.path().join("tool")));
        assert_eq!(find_in("other", &dirs), None);
    }

    #[test]
    fn missing_binaries_say_how_to_build_them() {
        let err = AppError::NotFound {
            name: "mesh-app".into(),
            package: package_of("mesh-app").into(),
            searched: "/x".into(),
        };
        assert!(err
            .to_string()
            .contains("cargo build -p e2e --bin mesh-app"));
    }
}
