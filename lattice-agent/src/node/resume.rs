//! What the worker keeps about each pod it serves in the parent's hands
//! (see `keeper`), to serve the pod again at once after a restart, before
//! anything is listed from the API: the pod's plan as the API last showed
//! it (its annotations' options as their text, parsed again on resume)
//! and the CNI sandbox it was enrolled for. The parent stores it as an
//! opaque string and hands it back as it came; the API watch then
//! reconciles as for any pod.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::pod_spec::{PodOptions, PodPlan};

/// The format's version: a state of another version is not resumed from
/// (the pod then waits for the API, as a pod handed over without state).
const VERSION: u32 = 1;

/// What a pod is served again with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resume {
    pub plan: PodPlan,
    /// The CNI sandbox (container ID) it was enrolled for, if by CNI ADD.
    pub sandbox: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct Saved {
    v: u32,
    plan: PodPlan,
    sandbox: Option<String>,
    /// The pod's upstream-TLS annotation (`plan.options` is not
    /// serialized).
    upstream_tls: Option<String>,
}

impl Resume {
    /// The state to hand the parent; none for a pod whose plan has no
    /// identity (see `IdentityPlan::Missing`).
    pub fn encode(&self) -> Option<String> {
        let saved = Saved {
            v: VERSION,
            plan: self.plan.clone(),
            sandbox: self.sandbox.clone(),
            upstream_tls: self.plan.options.upstream_tls_annotation.clone(),
        };
        serde_json::to_string(&saved).ok()
    }

    /// A state this version can resume from.
    pub fn decode(state: &str) -> Option<Self> {
        let saved: Saved = serde_json::from_str(state).ok()?;
        if saved.v != VERSION {
            return None;
        }
        let mut plan = saved.plan;
        plan.options = Arc::new(PodOptions::from_annotations(
            &plan.display_name(),
            saved.upstream_tls.as_deref(),
        ));
        Some(Self {
            plan,
            sandbox: saved.sandbox,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::node::pod_spec::{IdentityPlan, MissingIdentity, ProjectedToken};

    fn irsa_plan(name: &str, upstream_tls: Option<&str>) -> PodPlan {
        PodPlan {
            uid: format!("u-{name}"),
            namespace: "shop".into(),
            name: name.into(),
            ips: vec!["10.0.0.7".parse().unwrap()],
            identity: IdentityPlan::Irsa {
                service_account: name.into(),
                role_arn: format!("arn:aws:iam::123456789012:role/{name}"),
                token: ProjectedToken {
                    volume: "aws-iam-token".into(),
                    relative: PathBuf::from("token"),
                    audience: Some("sts.amazonaws.com".into()),
                },
                session_name: None,
            },
            region: Some("us-west-2".into()),
            options: Arc::new(PodOptions::from_annotations(
                &format!("shop/{name}"),
                upstream_tls,
            )),
        }
    }

    #[test]
    fn a_pod_resumes_as_it_was_served() {
        let resume = Resume {
            plan: irsa_plan("cart", Some("port:443, host:*.example.com")),
            sandbox: Some("c0ffee".into()),
        };
        assert!(resume.plan.options.upstream_tls.is_some());
        let state = resume.encode().unwrap();
        assert!(state.starts_with(r#"{"v":1,"#), "{state}");
        assert_eq!(Resume::decode(&state), Some(resume));
    }

    #[test]
    fn a_bad_annotation_resumes_with_its_warning() {
        let plan = irsa_plan("bad", Some("nonsense:1"));
        assert_eq!(plan.options.warnings.len(), 1, "{:?}", plan.options);
        let resume = Resume {
            plan,
            sandbox: None,
        };
        let back = Resume::decode(&resume.encode().unwrap()).unwrap();
        assert_eq!(back, resume);
    }

    /// Its requests get 503 with a typed reason the state does not carry:
    /// it is served again once the API is listed.
    #[test]
    fn a_pod_without_identity_keeps_no_state() {
        let mut plan = irsa_plan("none", None);
        plan.identity = IdentityPlan::Missing(MissingIdentity::Undeclared {
            pod: "shop/none".into(),
            referenced: Vec::new(),
        });
        let resume = Resume {
            plan,
            sandbox: None,
        };
        assert_eq!(resume.encode(), None);
    }

    #[test]
    fn another_version_or_garbage_waits_for_the_api() {
        assert_eq!(Resume::decode(r#"{"v":2,"plan":{},"sandbox":null}"#), None);
        assert_eq!(Resume::decode("not json"), None);
        assert_eq!(Resume::decode(""), None);
    }
}
