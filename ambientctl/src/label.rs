//! `ambientctl label namespace NS [--remove]`: enrolls a namespace in the
//! ambient data plane by labelling it `istio.io/dataplane-mode=ambient`
//! (or takes it out). istiod-lite and the node agent watch that label: the
//! agent captures the namespace's pods into ztunnel, istiod-lite marks
//! their workloads HBONE. Same effect as `kubectl label namespace NS
//! istio.io/dataplane-mode=ambient`, and prints what kubectl prints.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Patch, PatchParams};
use kube::Api;

use crate::kubeclient::{self, KubeError, LocalMesh};

pub const DATAPLANE_MODE: &str = "istio.io/dataplane-mode";
pub const AMBIENT: &str = "ambient";

#[derive(Debug, thiserror::Error)]
pub enum LabelError {
    #[error("{0}")]
    Kube(#[from] KubeError),
    #[error("namespaces \"{0}\" not found")]
    NotFound(String),
    #[error("labelling namespace {namespace}: {reason}")]
    Patch { namespace: String, reason: String },
    #[error("starting the async runtime: {0}")]
    Runtime(#[source] std::io::Error),
}

#[derive(Args)]
pub struct LabelArgs {
    /// Kubernetes configuration file (default: KUBECONFIG, else the local
    /// mesh when it runs, else ~/.kube/config or in-cluster).
    #[arg(long, global = true)]
    kubeconfig: Option<PathBuf>,
    #[command(subcommand)]
    target: LabelTarget,
}

#[derive(Subcommand)]
enum LabelTarget {
    /// Enroll a namespace in ambient mode (`istio.io/dataplane-mode=ambient`).
    #[command(visible_alias = "ns")]
    Namespace {
        /// The namespace.
        name: String,
        /// Remove the label instead (the namespace leaves the mesh).
        #[arg(long)]
        remove: bool,
    },
}

/// The merge patch that sets (`Some`) or removes (`None`) the label.
pub fn label_patch(value: Option<&str>) -> serde_json::Value {
    serde_json::json!({ "metadata": { "labels": { DATAPLANE_MODE: value } } })
}

/// What kubectl prints after the change.
pub fn message(namespace: &str, remove: bool) -> String {
    if remove {
        format!("namespace/{namespace} unlabeled")
    } else {
        format!("namespace/{namespace} labeled")
    }
}

/// Sets (or removes) the ambient label on a namespace.
pub async fn label_namespace(
    client: kube::Client,
    name: &str,
    remove: bool,
) -> Result<(), LabelError> {
    let api: Api<Namespace> = Api::all(client);
    let value = (!remove).then_some(AMBIENT);
    api.patch(
        name,
        &PatchParams::default(),
        &Patch::Merge(&label_patch(value)),
    )
    .await
    .map_err(|e| match &e {
        kube::Error::Api(s) if s.code == 404 => LabelError::NotFound(name.to_string()),
        _ => LabelError::Patch {
            namespace: name.to_string(),
            reason: e.to_string(),
        },
    })?;
    Ok(())
}

pub fn run(args: LabelArgs) -> Result<i32, LabelError> {
    let LabelTarget::Namespace { name, remove } = args.target;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(LabelError::Runtime)?;
    let local = LocalMesh::detect(&kubeclient::state_dir());
    let target = kubeclient::target(args.kubeconfig.as_deref(), local.as_ref());
    rt.block_on(async {
        let client = kubeclient::client(&target).await?;
        label_namespace(client, &name, remove).await
    })?;
    println!("{}", message(&name, remove));
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patches_and_messages() {
        assert_eq!(
            label_patch(Some("ambient")).to_string(),
            r#"{"metadata":{"labels":{"istio.io/dataplane-mode":"ambient"}}}"#
        );
        // A JSON merge patch removes a key with null.
        assert_eq!(
            label_patch(None).to_string(),
            r#"{"metadata":{"labels":{"istio.io/dataplane-mode":null}}}"#
        );
        assert_eq!(message("bookinfo", false), "namespace/bookinfo labeled");
        assert_eq!(message("bookinfo", true), "namespace/bookinfo unlabeled");
    }

    #[tokio::test]
    async fn patches_the_namespace() {
        use crate::kubeclient::mock::{self, route};
        let ns = serde_json::json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": "bookinfo", "labels": {DATAPLANE_MODE: AMBIENT}}});
        let (client, seen) = mock::client(vec![route(
            "PATCH",
            "/api/v1/namespaces/bookinfo?",
            200,
            ns,
        )]);
        label_namespace(client.clone(), "bookinfo", false)
            .await
            .unwrap();
        assert_eq!(
            seen.lock().unwrap().as_slice(),
            ["PATCH /api/v1/namespaces/bookinfo? application/merge-patch+json"]
        );
        let e = label_namespace(client, "nope", true).await.unwrap_err();
        assert_eq!(e.to_string(), "namespaces \"nope\" not found");
    }
}
