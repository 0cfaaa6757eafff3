//! What the node agent does with a pod, decided from its API object alone
//! (and its namespace's labels): pure functions, tested without a cluster.
//!
//! A pod is served when its annotation
//! `vpc-lattices-svcs.amazonaws.com/agent-inject` is `"true"` (the
//! annotation the iptables setup's Kyverno policy matches), or its
//! namespace carries that label with value `true` and the pod does not
//! opt out with the annotation set to anything else. Its identity comes
//! from what the EKS webhooks inject into its containers' environment:
//!
//! - IRSA: `AWS_ROLE_ARN` + `AWS_WEB_IDENTITY_TOKEN_FILE` (projected volume
//!   `aws-iam-token`);
//! - EKS Pod Identity: `AWS_CONTAINER_CREDENTIALS_FULL_URI` +
//!   `AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE` (volume
//!   `eks-pod-identity-token`).
//!
//! IRSA wins where a container has both, as in the SDKs' default chain.
//!
//! A pod may set its own TLS origination rules with the annotation
//! `vpc-lattices-svcs.amazonaws.com/upstream-tls` (comma-separated rules,
//! as `--upstream-tls-rule` takes them; empty: none), which replace the
//! agent's. One that does not parse is reported (an Event names the
//! problem) and the pod is served with the agent's rules.
//! The token's path inside the container is mapped through the container's
//! volume mounts to the projected volume the kubelet keeps on the node.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Component, Path, PathBuf},
    sync::Arc,
};

use k8s_openapi::api::core::v1::{Container, Pod, PodSpec};

use crate::proxy::tls_rules::{TlsRuleError, TlsRules};

/// The annotation (pods) and label (namespaces) that ask for signing.
pub const INJECT: &str = "vpc-lattices-svcs.amazonaws.com/agent-inject";
/// The annotation with a pod's own TLS origination rules.
pub const UPSTREAM_TLS: &str = "vpc-lattices-svcs.amazonaws.com/upstream-tls";

const ROLE_ARN: &str = "AWS_ROLE_ARN";
const WEB_IDENTITY_TOKEN_FILE: &str = "AWS_WEB_IDENTITY_TOKEN_FILE";
const ROLE_SESSION_NAME: &str = "AWS_ROLE_SESSION_NAME";
const FULL_URI: &str = "AWS_CONTAINER_CREDENTIALS_FULL_URI";
const AUTH_TOKEN_FILE: &str = "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE";
const REGION: &str = "AWS_REGION";
const DEFAULT_REGION: &str = "AWS_DEFAULT_REGION";

/// Hosts a container-credentials endpoint may have over plain HTTP: the
/// EKS Pod Identity Agent and the ECS agent, reachable from the node. A
/// loopback URI names the pod's own loopback, which the node agent's
/// credential calls (made from the node) cannot reach.
const CONTAINER_CREDENTIALS_HOSTS: [&str; 3] =
    ["169.254.170.23", "169.254.170.2", "[fd00:ec2::23]"];

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Not asked for, or not (yet, or any more) running with an IP.
    Ignore,
    /// Asked for, but cannot be served; the reason is logged and reported.
    Refuse(Refusal),
    Enroll(Box<PodPlan>),
}

/// Why a pod that asks for signing cannot be served. Equal when the pod
/// is refused for the same reason (told once, not on every update).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(
        "pod {pod} uses hostNetwork: it shares the node's network namespace, \
         where intercepting its connections would intercept the node's"
    )]
    HostNetwork { pod: String },
}

/// Why a pod has no identity to sign with: what its spec gets wrong. The
/// pod's own text is Debug-quoted, so it stays one escaped line in
/// Events, logs and `/pods`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MissingIdentity {
    #[error(
        "pod {pod} has no AWS identity: no container sets {ROLE_ARN} and \
         {WEB_IDENTITY_TOKEN_FILE} (IRSA) or {FULL_URI} and {AUTH_TOKEN_FILE} \
         (EKS Pod Identity); node mode never signs with the node's credentials{}",
        unresolved_note(referenced)
    )]
    Undeclared {
        pod: String,
        /// Identity variables set with `valueFrom`.
        referenced: Vec<&'static str>,
    },
    #[error("pod {pod}: {ROLE_ARN} {arn:?} of container {container} is not an IAM role ARN")]
    RoleArn {
        pod: String,
        container: String,
        arn: String,
        #[source]
        problem: RoleArnProblem,
    },
    #[error("pod {pod}: {variable} {file:?} of container {container}")]
    TokenFile {
        pod: String,
        container: String,
        variable: &'static str,
        file: String,
        #[source]
        problem: TokenProblem,
    },
    #[error("pod {pod}: {FULL_URI} {uri:?}")]
    CredentialsUri {
        pod: String,
        uri: String,
        #[source]
        problem: UriProblem,
    },
    #[error(
        "pod {pod}: containers {first} and {other} use different AWS identities; \
         node mode signs a pod's requests with one"
    )]
    DifferentIdentities {
        pod: String,
        first: String,
        other: String,
    },
}

fn unresolved_note(referenced: &[&str]) -> String {
    if referenced.is_empty() {
        String::new()
    } else {
        format!(
            " ({} set with valueFrom, which the node agent cannot resolve)",
            referenced.join(", ")
        )
    }
}

/// Why an `AWS_ROLE_ARN` is not an IAM role ARN.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RoleArnProblem {
    #[error("longer than 2048 characters")]
    TooLong,
    #[error("expected arn:<partition>:iam::<account>:role/<name>")]
    NotAnArn,
    #[error("the partition is not aws or aws-<name>")]
    Partition,
    #[error("not an ARN of IAM (arn:<partition>:iam::…)")]
    NotIam,
    #[error("the account is not 12 digits")]
    Account,
    #[error("not a role (…:role/<name>)")]
    NotARole,
    #[error("the role name is not 1 to 64 of A-Za-z0-9+=,.@_-")]
    RoleName,
    #[error("the role path holds a space, a control or a non-ASCII character")]
    RolePath,
}

/// Why a token file is not a service-account token the kubelet projects.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenProblem {
    #[error("no volume is mounted there")]
    NoVolume,
    #[error("volume {volume} is mounted with subPath, which node mode does not follow")]
    SubPath { volume: String },
    #[error("volume {volume} is not in the pod's spec")]
    NotInSpec { volume: String },
    #[error(
        "volume {volume} is not a projected volume (the EKS webhooks use projected \
         service-account tokens)"
    )]
    NotProjected { volume: String },
    #[error("outside its volume")]
    OutsideVolume,
    #[error("not a plain path to a file inside its volume")]
    NotAPlainPath,
    #[error(
        "volume {volume} projects no serviceAccountToken at {path:?} (the EKS webhooks \
         project the service account's token there)"
    )]
    NoServiceAccountToken { volume: String, path: String },
}

/// Why a container-credentials URI is not one the node agent calls.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UriProblem {
    #[error("not a URI")]
    NotAUri(#[source] Arc<http::uri::InvalidUri>),
    #[error(
        "node mode calls container-credentials endpoints over plain HTTP only \
         (EKS Pod Identity: http://169.254.170.23/v1/credentials)"
    )]
    NotHttp,
    #[error(
        "host {host} is not the EKS Pod Identity Agent ({}); a pod-local endpoint \
         cannot be reached from the node",
        CONTAINER_CREDENTIALS_HOSTS.join(", ")
    )]
    Host { host: String },
}

/// The URI itself is compared where a problem is (in
/// [`MissingIdentity::CredentialsUri`]); its parse error follows from it.
impl PartialEq for UriProblem {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::NotAUri(_), Self::NotAUri(_)) | (Self::NotHttp, Self::NotHttp) => true,
            (Self::Host { host: a }, Self::Host { host: b }) => a == b,
            _ => false,
        }
    }
}

impl Eq for UriProblem {}

/// A problem with a pod's annotations, served around (the pod is served
/// with the agent's settings instead).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AnnotationProblem {
    #[error("pod {pod}: its own TLS rules are ignored; its requests use the agent's TLS rules")]
    UpstreamTls {
        pod: String,
        #[source]
        error: TlsRuleError,
    },
}

/// Everything enrollment needs to know about a pod, from its API object.
/// A change in it (identity, IPs) means enrolling the pod anew.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodPlan {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub ips: Vec<IpAddr>,
    pub identity: IdentityPlan,
    /// `AWS_REGION` / `AWS_DEFAULT_REGION` of its containers, if any.
    pub region: Option<String>,
    /// What its annotations set beyond asking for signing.
    pub options: Arc<PodOptions>,
}

/// Settings a pod makes with its own annotations.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodOptions {
    /// Its own TLS origination rules; `None`: the agent's.
    pub upstream_tls: Option<Arc<TlsRules>>,
    /// Problems with its annotations, served around (each told in an
    /// Event).
    pub warnings: Vec<AnnotationProblem>,
}

impl PodPlan {
    /// Equal but for the IPs: for a pod served in a namespace that was
    /// given, new IPs change nothing.
    pub fn same_but_ips(&self, other: &Self) -> bool {
        Self {
            ips: Vec::new(),
            ..self.clone()
        } == Self {
            ips: Vec::new(),
            ..other.clone()
        }
    }

    /// `namespace/name`, as people name pods.
    pub fn display_name(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdentityPlan {
    Irsa {
        service_account: String,
        role_arn: String,
        token: ProjectedToken,
        /// `AWS_ROLE_SESSION_NAME` when the pod sets one.
        session_name: Option<String>,
    },
    PodIdentity {
        service_account: String,
        uri: String,
        token: ProjectedToken,
    },
    /// Nothing to sign with: every request gets 503 with this reason.
    Missing(MissingIdentity),
}

impl IdentityPlan {
    /// `irsa`, `pod-identity` or `none`, for `/pods` and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Irsa { .. } => "irsa",
            Self::PodIdentity { .. } => "pod-identity",
            Self::Missing(_) => "none",
        }
    }
}

/// A service-account token the kubelet projects into one of the pod's
/// volumes (a `serviceAccountToken` source): the token of the pod's
/// service account for `audience`, which the pod cannot write.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ProjectedToken {
    pub volume: String,
    /// Path inside the volume: only normal components.
    pub relative: PathBuf,
    /// `serviceAccountToken.audience`; None: the API server's own.
    pub audience: Option<String>,
}

impl ProjectedToken {
    /// Where the kubelet keeps it on the node.
    pub fn host_path(&self, kubelet_root: &Path, pod_uid: &str) -> PathBuf {
        kubelet_root
            .join("pods")
            .join(pod_uid)
            .join("volumes/kubernetes.io~projected")
            .join(&self.volume)
            .join(&self.relative)
    }
}

/// Decides what to do with `pod`, given its namespace's labels (`None`
/// when the namespace is not known yet): a pod is enrolled once it runs
/// with an IP (its namespace is then found through that IP).
pub fn decide(pod: &Pod, namespace_labels: Option<&BTreeMap<String, String>>) -> Decision {
    decide_with(pod, namespace_labels, true)
}

/// [`decide`] for a pod whose network namespace is known without its IP
/// (the CNI plugin passed it as the sandbox started, or the agent being
/// replaced did): enrolled before the API shows it running.
pub fn decide_at_start(pod: &Pod, namespace_labels: Option<&BTreeMap<String, String>>) -> Decision {
    decide_with(pod, namespace_labels, false)
}

fn decide_with(
    pod: &Pod,
    namespace_labels: Option<&BTreeMap<String, String>>,
    needs_ip: bool,
) -> Decision {
    let meta = &pod.metadata;
    let (Some(uid), Some(name), Some(namespace)) = (&meta.uid, &meta.name, &meta.namespace) else {
        return Decision::Ignore;
    };
    let annotation = meta.annotations.as_ref().and_then(|a| a.get(INJECT));
    let asked = match annotation {
        Some(v) => v == "true",
        None => namespace_labels
            .and_then(|l| l.get(INJECT))
            .is_some_and(|v| v == "true"),
    };
    if !asked {
        return Decision::Ignore;
    }
    let Some(spec) = &pod.spec else {
        return Decision::Ignore;
    };
    if spec.host_network == Some(true) {
        return Decision::Refuse(Refusal::HostNetwork {
            pod: format!("{namespace}/{name}"),
        });
    }
    let status = pod.status.as_ref();
    if status
        .and_then(|s| s.phase.as_deref())
        .is_some_and(|p| p == "Succeeded" || p == "Failed")
    {
        return Decision::Ignore;
    }
    let ips = pod_ips(pod);
    if needs_ip && ips.is_empty() {
        return Decision::Ignore;
    }
    let pod_name = format!("{namespace}/{name}");
    let (identity, region) = identity_plan(&pod_name, spec);
    let mut warnings = Vec::new();
    let upstream_tls = meta
        .annotations
        .as_ref()
        .and_then(|a| a.get(UPSTREAM_TLS))
        .and_then(|rules| {
            match TlsRules::parse_list(rules, &format!("annotation {UPSTREAM_TLS}")) {
                Ok(rules) => Some(Arc::new(rules)),
                Err(error) => {
                    warnings.push(AnnotationProblem::UpstreamTls {
                        pod: pod_name.clone(),
                        error,
                    });
                    None
                }
            }
        });
    Decision::Enroll(Box::new(PodPlan {
        uid: uid.clone(),
        namespace: namespace.clone(),
        name: name.clone(),
        ips,
        identity,
        region,
        options: Arc::new(PodOptions {
            upstream_tls,
            warnings,
        }),
    }))
}

fn pod_ips(pod: &Pod) -> Vec<IpAddr> {
    let Some(status) = &pod.status else {
        return Vec::new();
    };
    let mut ips: Vec<IpAddr> = status
        .pod_ips
        .iter()
        .flatten()
        .filter_map(|ip| ip.ip.parse().ok())
        .collect();
    if let Some(ip) = status.pod_ip.as_deref().and_then(|ip| ip.parse().ok())
        && !ips.contains(&ip)
    {
        ips.push(ip);
    }
    ips
}

/// The literal environment of one container (`valueFrom` entries are
/// listed separately: the agent cannot resolve them).
struct ContainerEnv<'a> {
    container: &'a Container,
    literal: BTreeMap<&'a str, &'a str>,
    referenced: Vec<&'a str>,
}

impl<'a> ContainerEnv<'a> {
    fn of(container: &'a Container) -> Self {
        let mut literal = BTreeMap::new();
        let mut referenced = Vec::new();
        for var in container.env.iter().flatten() {
            match (&var.value, &var.value_from) {
                (Some(v), _) => {
                    literal.insert(var.name.as_str(), v.as_str());
                }
                (None, Some(_)) => referenced.push(var.name.as_str()),
                (None, None) => {
                    literal.insert(var.name.as_str(), "");
                }
            }
        }
        Self {
            container,
            literal,
            referenced,
        }
    }

    fn get(&self, name: &str) -> Option<&'a str> {
        self.literal.get(name).copied().filter(|v| !v.is_empty())
    }
}

/// The identity the pod's containers declare, and their region.
fn identity_plan(pod_name: &str, spec: &PodSpec) -> (IdentityPlan, Option<String>) {
    let envs: Vec<ContainerEnv<'_>> = spec.containers.iter().map(ContainerEnv::of).collect();
    let region = envs
        .iter()
        .find_map(|e| e.get(REGION).or_else(|| e.get(DEFAULT_REGION)))
        .map(str::to_owned);
    let service_account = spec
        .service_account_name
        .clone()
        .unwrap_or_else(|| "default".to_owned());

    let mut found: Vec<(&str, IdentityPlan)> = Vec::new();
    for env in &envs {
        let plan = if let (Some(arn), Some(file)) =
            (env.get(ROLE_ARN), env.get(WEB_IDENTITY_TOKEN_FILE))
        {
            match (
                check_role_arn(arn),
                projected_token(spec, env.container, file),
            ) {
                (Err(problem), _) => IdentityPlan::Missing(MissingIdentity::RoleArn {
                    pod: pod_name.to_owned(),
                    container: env.container.name.clone(),
                    arn: arn.to_owned(),
                    problem,
                }),
                (_, Err(problem)) => IdentityPlan::Missing(MissingIdentity::TokenFile {
                    pod: pod_name.to_owned(),
                    container: env.container.name.clone(),
                    variable: WEB_IDENTITY_TOKEN_FILE,
                    file: file.to_owned(),
                    problem,
                }),
                (Ok(()), Ok(token)) => IdentityPlan::Irsa {
                    service_account: service_account.clone(),
                    role_arn: arn.to_owned(),
                    token,
                    session_name: env.get(ROLE_SESSION_NAME).map(str::to_owned),
                },
            }
        } else if let (Some(uri), Some(file)) = (env.get(FULL_URI), env.get(AUTH_TOKEN_FILE)) {
            match (
                check_credentials_uri(uri),
                projected_token(spec, env.container, file),
            ) {
                (Err(problem), _) => IdentityPlan::Missing(MissingIdentity::CredentialsUri {
                    pod: pod_name.to_owned(),
                    uri: uri.to_owned(),
                    problem,
                }),
                (_, Err(problem)) => IdentityPlan::Missing(MissingIdentity::TokenFile {
                    pod: pod_name.to_owned(),
                    container: env.container.name.clone(),
                    variable: AUTH_TOKEN_FILE,
                    file: file.to_owned(),
                    problem,
                }),
                (Ok(()), Ok(token)) => IdentityPlan::PodIdentity {
                    service_account: service_account.clone(),
                    uri: uri.to_owned(),
                    token,
                },
            }
        } else {
            continue;
        };
        found.push((env.container.name.as_str(), plan));
    }

    let identity = match found.as_slice() {
        [] => {
            let identity_variables = [ROLE_ARN, WEB_IDENTITY_TOKEN_FILE, FULL_URI, AUTH_TOKEN_FILE];
            let referenced = envs
                .iter()
                .flat_map(|e| e.referenced.iter())
                .filter_map(|n| identity_variables.into_iter().find(|v| v == n))
                .collect();
            IdentityPlan::Missing(MissingIdentity::Undeclared {
                pod: pod_name.to_owned(),
                referenced,
            })
        }
        [(_, plan)] => plan.clone(),
        [(first, plan), rest @ ..] => match rest.iter().find(|(_, p)| p != plan) {
            None => plan.clone(),
            Some((other, _)) => IdentityPlan::Missing(MissingIdentity::DifferentIdentities {
                pod: pod_name.to_owned(),
                first: (*first).to_owned(),
                other: (*other).to_owned(),
            }),
        },
    };
    (identity, region)
}

/// Maps `file` (a path inside `container`) to the service-account token
/// a projected volume holds there.
fn projected_token(
    spec: &PodSpec,
    container: &Container,
    file: &str,
) -> Result<ProjectedToken, TokenProblem> {
    let file = Path::new(file);
    let mount = container
        .volume_mounts
        .iter()
        .flatten()
        .filter(|m| file.starts_with(&m.mount_path))
        .max_by_key(|m| m.mount_path.len())
        .ok_or(TokenProblem::NoVolume)?;
    let volume = || mount.name.clone();
    if mount.sub_path.as_deref().is_some_and(|s| !s.is_empty())
        || mount
            .sub_path_expr
            .as_deref()
            .is_some_and(|s| !s.is_empty())
    {
        return Err(TokenProblem::SubPath { volume: volume() });
    }
    let in_spec = spec
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount.name)
        .ok_or_else(|| TokenProblem::NotInSpec { volume: volume() })?;
    let Some(projected) = &in_spec.projected else {
        return Err(TokenProblem::NotProjected { volume: volume() });
    };
    let relative = file
        .strip_prefix(&mount.mount_path)
        .map_err(|_| TokenProblem::OutsideVolume)?;
    let normal = relative
        .components()
        .all(|c| matches!(c, Component::Normal(_)));
    if relative.as_os_str().is_empty() || !normal {
        return Err(TokenProblem::NotAPlainPath);
    }
    // Any other source (a ConfigMap, a Secret, the downward API) holds what
    // the pod's own objects say, which a pod sharing an identity with
    // others must not hand them as their token. (The API server refuses
    // two sources projecting one path.)
    let token = projected
        .sources
        .iter()
        .flatten()
        .filter_map(|s| s.service_account_token.as_ref())
        .find(|t| Path::new(&t.path) == relative)
        .ok_or_else(|| TokenProblem::NoServiceAccountToken {
            volume: volume(),
            path: relative.display().to_string(),
        })?;
    Ok(ProjectedToken {
        volume: mount.name.clone(),
        relative: relative.to_owned(),
        audience: token.audience.clone().filter(|a| !a.is_empty()),
    })
}

/// `arn:<partition>:iam::<account>:role/<path/><name>`, as IAM names
/// roles: the partition `aws` or `aws-…`, a 12-digit account, a name of
/// 1 to 64 of `A-Za-z0-9+=,.@_-` and a path of printable ASCII without
/// space (which admits `"`, `}` and `\`: label values are escaped where
/// they are written).
fn check_role_arn(arn: &str) -> Result<(), RoleArnProblem> {
    const MAX_ARN: usize = 2048;
    const MAX_PATH: usize = 512;
    const MAX_NAME: usize = 64;
    if arn.len() > MAX_ARN {
        return Err(RoleArnProblem::TooLong);
    }
    let mut parts = arn.splitn(6, ':');
    let (Some("arn"), Some(partition), Some(service), Some(region), Some(account), Some(resource)) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return Err(RoleArnProblem::NotAnArn);
    };
    let partition_ok = partition == "aws"
        || partition.strip_prefix("aws-").is_some_and(|rest| {
            !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_lowercase() || b == b'-')
        });
    if !partition_ok {
        return Err(RoleArnProblem::Partition);
    }
    if service != "iam" || !region.is_empty() {
        return Err(RoleArnProblem::NotIam);
    }
    if account.len() != 12 || !account.bytes().all(|b| b.is_ascii_digit()) {
        return Err(RoleArnProblem::Account);
    }
    let Some(path_and_name) = resource.strip_prefix("role/") else {
        return Err(RoleArnProblem::NotARole);
    };
    let (path, name) = match path_and_name.rsplit_once('/') {
        Some((path, name)) => (path, name),
        None => ("", path_and_name),
    };
    let name_ok = (1..=MAX_NAME).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+=,.@_-".contains(&b));
    if !name_ok {
        return Err(RoleArnProblem::RoleName);
    }
    if path.len() > MAX_PATH || !path.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
        return Err(RoleArnProblem::RolePath);
    }
    Ok(())
}

fn check_credentials_uri(uri: &str) -> Result<(), UriProblem> {
    let parsed: http::Uri = uri.parse().map_err(|e| UriProblem::NotAUri(Arc::new(e)))?;
    if parsed.scheme_str() != Some("http") {
        return Err(UriProblem::NotHttp);
    }
    let host = parsed.host().unwrap_or_default();
    if !CONTAINER_CREDENTIALS_HOSTS.contains(&host) {
        return Err(UriProblem::Host {
            host: host.to_owned(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error_chain;

    fn pod(json: serde_json::Value) -> Pod {
        serde_json::from_value(json).expect("pod JSON")
    }

    /// A pod like the EKS IRSA webhook leaves it.
    fn irsa_pod() -> serde_json::Value {
        serde_json::json!({
            "metadata": {
                "name": "app1-v1-abc", "namespace": "app1", "uid": "1111-2222",
                "annotations": {INJECT: "true"}
            },
            "spec": {
                "serviceAccountName": "app1-sa",
                "containers": [{
                    "name": "app1",
                    "env": [
                        {"name": "AWS_REGION", "value": "us-west-2"},
                        {"name": "AWS_ROLE_ARN", "value": "arn:aws:iam::111122223333:role/app1"},
                        {"name": "AWS_WEB_IDENTITY_TOKEN_FILE", "value": "/var/run/secrets/eks.amazonaws.com/serviceaccount/token"}
                    ],
                    "volumeMounts": [{"name": "aws-iam-token", "mountPath": "/var/run/secrets/eks.amazonaws.com/serviceaccount", "readOnly": true}]
                }],
                "volumes": [{"name": "aws-iam-token", "projected": {"sources": [{"serviceAccountToken": {"audience": "sts.amazonaws.com", "expirationSeconds": 86400, "path": "token"}}]}}]
            },
            "status": {"phase": "Running", "podIP": "169.254.64.5", "podIPs": [{"ip": "169.254.64.5"}]}
        })
    }

    fn plan(json: serde_json::Value) -> PodPlan {
        match decide(&pod(json), None) {
            Decision::Enroll(p) => *p,
            other => panic!("not enrolled: {other:?}"),
        }
    }

    #[test]
    fn irsa_pod_maps_the_token_to_the_kubelet_volume() {
        let p = plan(irsa_pod());
        assert_eq!(p.display_name(), "app1/app1-v1-abc");
        assert_eq!(p.ips, vec!["169.254.64.5".parse::<IpAddr>().unwrap()]);
        assert_eq!(p.region.as_deref(), Some("us-west-2"));
        let IdentityPlan::Irsa {
            service_account,
            role_arn,
            token,
            session_name,
        } = &p.identity
        else {
            panic!("{:?}", p.identity)
        };
        assert_eq!(service_account, "app1-sa");
        assert_eq!(role_arn, "arn:aws:iam::111122223333:role/app1");
        assert_eq!(session_name, &None);
        assert_eq!(
            token.host_path(Path::new("/var/lib/kubelet"), &p.uid),
            Path::new(
                "/var/lib/kubelet/pods/1111-2222/volumes/kubernetes.io~projected/aws-iam-token/token"
            )
        );
    }

    /// A pod whose sandbox is starting (Pending, no IP): enrolled only when
    /// its namespace is known otherwise (CNI); the same plan but for IPs.
    #[test]
    fn a_starting_pod_is_enrolled_only_at_start() {
        let mut j = irsa_pod();
        j["status"] = serde_json::json!({"phase": "Pending"});
        assert_eq!(decide(&pod(j.clone()), None), Decision::Ignore);
        let Decision::Enroll(starting) = decide_at_start(&pod(j.clone()), None) else {
            panic!("not enrolled at start")
        };
        assert!(starting.ips.is_empty());
        let running = plan(irsa_pod());
        assert_ne!(*starting, running);
        assert!(starting.same_but_ips(&running));
        j["metadata"]["annotations"] = serde_json::json!({});
        assert_eq!(decide_at_start(&pod(j.clone()), None), Decision::Ignore);
        j["status"] = serde_json::json!({"phase": "Succeeded"});
        j["metadata"]["annotations"] = serde_json::json!({INJECT: "true"});
        assert_eq!(decide_at_start(&pod(j), None), Decision::Ignore);
    }

    #[test]
    fn tls_rules_from_the_annotation_and_a_bad_one_reported() {
        assert_eq!(plan(irsa_pod()).options.upstream_tls, None);
        let mut j = irsa_pod();
        j["metadata"]["annotations"][UPSTREAM_TLS] =
            "host:*.vpc-lattice-svcs.us-west-2.on.aws => 443, port:8443".into();
        let p = plan(j.clone()).options;
        assert!(p.warnings.is_empty(), "{:?}", p.warnings);
        let rules = p.upstream_tls.clone().expect("rules");
        assert_eq!(
            rules.tls_port(
                "169.254.171.33:80".parse().unwrap(),
                "svc.vpc-lattice-svcs.us-west-2.on.aws"
            ),
            Some(443)
        );
        // Empty: none for this pod, whatever the agent's.
        j["metadata"]["annotations"][UPSTREAM_TLS] = "".into();
        assert_eq!(
            plan(j.clone()).options.upstream_tls,
            Some(Arc::new(TlsRules::default()))
        );
        // Not a rule: enrolled with the agent's rules, and told why.
        j["metadata"]["annotations"][UPSTREAM_TLS] = "port:443, https://svc".into();
        let p = plan(j).options;
        assert_eq!(p.upstream_tls, None);
        assert_eq!(p.warnings.len(), 1);
        let why = error_chain(&p.warnings[0]);
        assert_eq!(
            why,
            format!(
                "pod app1/app1-v1-abc: its own TLS rules are ignored; its requests use the \
                 agent's TLS rules: annotation {UPSTREAM_TLS} \"https://svc\": unknown selector \
                 \"https://svc\"; expected *, port:N, cidr:PREFIX or host:NAME, optionally \
                 followed by => PORT"
            )
        );
        assert!(
            why.contains("app1/app1-v1-abc")
                && why.contains(UPSTREAM_TLS)
                && why.contains("\"https://svc\"")
                && why.contains("unknown selector")
                && why.contains("agent's TLS rules"),
            "{why}"
        );
    }

    #[test]
    fn pod_identity_pod() {
        let mut j = irsa_pod();
        j["spec"]["containers"][0]["env"] = serde_json::json!([
            {"name": "AWS_CONTAINER_CREDENTIALS_FULL_URI", "value": "http://169.254.170.23/v1/credentials"},
            {"name": "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", "value": "/var/run/secrets/pods.eks.amazonaws.com/serviceaccount/eks-pod-identity-token"}
        ]);
        j["spec"]["containers"][0]["volumeMounts"] = serde_json::json!([
            {"name": "eks-pod-identity-token", "mountPath": "/var/run/secrets/pods.eks.amazonaws.com/serviceaccount", "readOnly": true}
        ]);
        j["spec"]["volumes"] = serde_json::json!([
            {"name": "eks-pod-identity-token", "projected": {"sources": [{"serviceAccountToken": {"audience": "pods.eks.amazonaws.com", "path": "eks-pod-identity-token"}}]}}
        ]);
        let p = plan(j);
        assert_eq!(p.region, None);
        match &p.identity {
            IdentityPlan::PodIdentity { uri, token, .. } => {
                assert_eq!(uri, "http://169.254.170.23/v1/credentials");
                assert_eq!(token.volume, "eks-pod-identity-token");
                assert_eq!(token.relative, Path::new("eks-pod-identity-token"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn annotation_or_namespace_label_asks_and_annotation_opts_out() {
        let mut j = irsa_pod();
        j["metadata"]["annotations"] = serde_json::json!({});
        let labels: BTreeMap<String, String> = [(INJECT.to_owned(), "true".to_owned())].into();
        assert_eq!(decide(&pod(j.clone()), None), Decision::Ignore);
        assert!(matches!(
            decide(&pod(j.clone()), Some(&labels)),
            Decision::Enroll(_)
        ));
        j["metadata"]["annotations"] = serde_json::json!({INJECT: "false"});
        assert_eq!(decide(&pod(j), Some(&labels)), Decision::Ignore);
    }

    #[test]
    fn host_network_is_refused_and_pods_without_ip_wait() {
        let mut j = irsa_pod();
        j["spec"]["hostNetwork"] = true.into();
        let Decision::Refuse(why) = decide(&pod(j), None) else {
            panic!()
        };
        let why = error_chain(&why);
        assert!(
            why.contains("app1/app1-v1-abc") && why.contains("hostNetwork"),
            "{why}"
        );
        let mut j = irsa_pod();
        j["status"] = serde_json::json!({"phase": "Pending"});
        assert_eq!(decide(&pod(j), None), Decision::Ignore);
        let mut j = irsa_pod();
        j["status"]["phase"] = "Succeeded".into();
        assert_eq!(decide(&pod(j), None), Decision::Ignore);
    }

    #[test]
    fn missing_identity_names_the_pod_and_what_is_missing() {
        let mut j = irsa_pod();
        j["spec"]["containers"][0]["env"] = serde_json::json!([
            {"name": "AWS_ROLE_ARN", "valueFrom": {"configMapKeyRef": {"name": "c", "key": "k"}}}
        ]);
        let IdentityPlan::Missing(why) = plan(j).identity else {
            panic!()
        };
        let why = error_chain(&why);
        assert!(
            why.contains("pod app1/app1-v1-abc has no AWS identity"),
            "{why}"
        );
        assert!(why.contains("AWS_ROLE_ARN set with valueFrom"), "{why}");
        assert!(
            why.contains("never signs with the node's credentials"),
            "{why}"
        );
    }

    #[test]
    fn containers_with_different_identities_are_not_guessed_between() {
        let mut j = irsa_pod();
        let mut second = j["spec"]["containers"][0].clone();
        second["name"] = "sidecar".into();
        second["env"][1]["value"] = "arn:aws:iam::111122223333:role/other".into();
        j["spec"]["containers"]
            .as_array_mut()
            .unwrap()
            .push(second.clone());
        let IdentityPlan::Missing(why) = plan(j.clone()).identity else {
            panic!()
        };
        let why = error_chain(&why);
        assert!(
            why.contains("containers app1 and sidecar use different AWS identities"),
            "{why}"
        );
        // The same identity twice is one identity.
        second["env"][1]["value"] = "arn:aws:iam::111122223333:role/app1".into();
        j["spec"]["containers"][1] = second;
        assert!(matches!(plan(j).identity, IdentityPlan::Irsa { .. }));
    }

    #[test]
    fn token_paths_that_leave_their_volume_are_refused() {
        for (file, want) in [
            (
                "/var/run/secrets/eks.amazonaws.com/serviceaccount/../../../../etc/shadow",
                "plain path",
            ),
            ("/etc/token", "no volume is mounted there"),
            (
                "/var/run/secrets/eks.amazonaws.com/serviceaccount",
                "plain path",
            ),
        ] {
            let mut j = irsa_pod();
            j["spec"]["containers"][0]["env"][2]["value"] = file.into();
            let IdentityPlan::Missing(why) = plan(j).identity else {
                panic!("{file}")
            };
            let why = error_chain(&why);
            assert!(why.contains(want), "{file}: {why}");
        }
        // The variable, the pod's value, the container, then what is wrong.
        let mut j = irsa_pod();
        j["spec"]["containers"][0]["env"][2]["value"] = "/etc/token".into();
        let IdentityPlan::Missing(why) = plan(j).identity else {
            panic!()
        };
        assert_eq!(
            error_chain(&why),
            "pod app1/app1-v1-abc: AWS_WEB_IDENTITY_TOKEN_FILE \"/etc/token\" of container \
             app1: no volume is mounted there"
        );
        let mut j = irsa_pod();
        j["spec"]["volumes"][0] =
            serde_json::json!({"name": "aws-iam-token", "hostPath": {"path": "/"}});
        let IdentityPlan::Missing(why) = plan(j).identity else {
            panic!()
        };
        let why = error_chain(&why);
        assert!(why.contains("not a projected volume"), "{why}");
    }

    /// What a pod writes in `AWS_ROLE_ARN` ends up in metric labels, logs
    /// and STS calls: only IAM role ARNs are taken (a role path may hold
    /// any printable ASCII but space, so `"`, `}` and `\` are valid).
    #[test]
    fn role_arns_that_are_not_iam_role_arns_are_refused() {
        for arn in [
            "arn:aws:iam::111122223333:role/app\nlattice_injected_total 1",
            "arn:aws:iam::111122223333:role/a\"} 1\n#",
            "arn:aws:iam::111122223333:role/with space",
            "arn:aws:iam::111122223333:role/",
            "arn:aws:iam::111122223333:role/path/",
            "arn:aws:iam::1111:role/app",
            "arn:aws:iam::111122223333:user/app",
            "arn:aws:sts::111122223333:role/app",
            "arn:aws:iam:us-west-2:111122223333:role/app",
            "role/app",
        ] {
            let mut j = irsa_pod();
            j["spec"]["containers"][0]["env"][1]["value"] = arn.into();
            let IdentityPlan::Missing(why) = plan(j).identity else {
                panic!("{arn:?} was taken")
            };
            let why = error_chain(&why);
            assert!(
                why.contains("AWS_ROLE_ARN") && why.contains("not an IAM role ARN"),
                "{arn:?}: {why}"
            );
            assert!(
                !why.contains('\n'),
                "{arn:?}: the reason is one line: {why}"
            );
        }
        for arn in [
            "arn:aws:iam::111122223333:role/q\"u}o\\te/app",
            "arn:aws-cn:iam::111122223333:role/app",
            "arn:aws-us-gov:iam::111122223333:role/a/b/c+=,.@_-1",
        ] {
            let mut j = irsa_pod();
            j["spec"]["containers"][0]["env"][1]["value"] = arn.into();
            let IdentityPlan::Irsa { role_arn, .. } = plan(j).identity else {
                panic!("{arn:?} refused")
            };
            assert_eq!(role_arn, arn);
        }
    }

    /// The token must be what the EKS webhooks project: a
    /// `serviceAccountToken` source at that path. A file of any other
    /// source (a ConfigMap, a Secret, the downward API) in a projected
    /// volume is the pod's own writing, not a token of its service account.
    #[test]
    fn the_token_must_be_a_service_account_token_projection() {
        let mut j = irsa_pod();
        j["spec"]["volumes"][0]["projected"]["sources"] = serde_json::json!([
            {"configMap": {"name": "fake", "items": [{"key": "t", "path": "token"}]}}
        ]);
        let IdentityPlan::Missing(why) = plan(j).identity else {
            panic!("a ConfigMap was taken for a token")
        };
        let why = error_chain(&why);
        assert!(why.contains("serviceAccountToken"), "{why}");

        let mut j = irsa_pod();
        j["spec"]["volumes"][0]["projected"]["sources"][0]["serviceAccountToken"]["path"] =
            "other".into();
        let IdentityPlan::Missing(why) = plan(j).identity else {
            panic!("a file beside the token was taken for it")
        };
        let why = error_chain(&why);
        assert!(why.contains("serviceAccountToken"), "{why}");

        // Beside other sources, the token's own path is what counts.
        let mut j = irsa_pod();
        j["spec"]["volumes"][0]["projected"]["sources"] = serde_json::json!([
            {"configMap": {"name": "ca", "items": [{"key": "ca", "path": "ca.crt"}]}},
            {"serviceAccountToken": {"audience": "sts.amazonaws.com", "path": "token"}}
        ]);
        assert!(matches!(plan(j).identity, IdentityPlan::Irsa { .. }));
    }

    #[test]
    fn pod_local_container_credentials_uris_are_refused() {
        for (uri, want) in [
            (
                "http://127.0.0.1:9911/creds",
                "cannot be reached from the node",
            ),
            ("https://creds.example/v1", "plain HTTP only"),
        ] {
            let why = error_chain(&check_credentials_uri(uri).unwrap_err());
            assert!(why.contains(want), "{uri}: {why}");
        }
        check_credentials_uri("http://169.254.170.23/v1/credentials").unwrap();
        check_credentials_uri("http://[fd00:ec2::23]/v1/credentials").unwrap();
    }
}
