//! `/pods`: the pods the node agent serves or tried to, one row each, no
//! secrets. Rows are rebuilt from the pod table after every change; the
//! traffic counters are read when the page is asked for.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, atomic::Ordering},
};

use serde::Serialize;

use super::{
    PodTable,
    pod_spec::{IdentityPlan, PodPlan},
    state::Phase,
};
use crate::{admin::PodsReport, error_chain, metrics::Counts, proxy::classify::Kind};

/// `/pods`, shared with the admin server.
#[derive(Default)]
pub struct NodeReport {
    rows: Mutex<Vec<ReportRow>>,
}

struct ReportRow {
    row: PodRow,
    /// A served pod's live counters.
    counts: Option<Arc<Counts>>,
}

#[derive(Serialize, Clone)]
struct PodRow {
    namespace: String,
    name: String,
    uid: String,
    /// `enrolled`, `enrolling`, `failed` (retried) or `refused`.
    state: &'static str,
    /// Why it is not served, or served without an identity: the error
    /// with its causes, on one line.
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    /// `irsa`, `pod-identity` or `none`.
    identity: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    role_arn: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    service_account: Option<String>,
    ips: Vec<String>,
    #[serde(flatten)]
    traffic: Traffic,
}

/// A served pod's counters, as of the request for `/pods`.
#[derive(Serialize, Clone, Default)]
struct Traffic {
    requests: u64,
    errors: u64,
    /// Client connections by kind (`http1`, `h2c`: signed; `tls`,
    /// `opaque`, `server-first`: passed through).
    connections: BTreeMap<&'static str, u64>,
}

impl Traffic {
    fn read(counts: &Counts) -> Self {
        Self {
            requests: counts.requests.load(Ordering::Relaxed),
            errors: counts.errors.load(Ordering::Relaxed),
            connections: Kind::ALL
                .iter()
                .map(|k| {
                    (
                        k.as_str(),
                        counts.connections[k.index()].load(Ordering::Relaxed),
                    )
                })
                .collect(),
        }
    }
}

impl NodeReport {
    /// The rows for `table`'s pods, sorted by namespace and name.
    pub fn update(&self, table: &PodTable) {
        let mut rows: Vec<ReportRow> = table
            .iter()
            .filter_map(|(uid, entry)| match &entry.phase {
                Phase::Enrolled(pod) => Some(ReportRow {
                    row: plan_row(
                        &pod.plan,
                        "enrolled",
                        pod.missing_identity.as_deref().map(|e| error_chain(e)),
                    ),
                    counts: Some(pod.served.counts()),
                }),
                Phase::Enrolling { plan, .. } => Some(ReportRow {
                    row: plan_row(plan, "enrolling", None),
                    counts: None,
                }),
                Phase::Failed(failed) => Some(ReportRow {
                    row: plan_row(&failed.plan, "failed", Some(error_chain(&*failed.error))),
                    counts: None,
                }),
                Phase::Refused { pod, reason } => Some(ReportRow {
                    row: PodRow {
                        namespace: pod.namespace.clone(),
                        name: pod.name.clone(),
                        uid: uid.to_owned(),
                        state: "refused",
                        reason: Some(error_chain(reason)),
                        identity: "none",
                        role_arn: None,
                        service_account: None,
                        ips: Vec::new(),
                        traffic: Traffic::default(),
                    },
                    counts: None,
                }),
                Phase::HandedOver { .. } | Phase::SandboxDeleted => None,
            })
            .collect();
        rows.sort_by(|a, b| (&a.row.namespace, &a.row.name).cmp(&(&b.row.namespace, &b.row.name)));
        *self.rows.lock().unwrap_or_else(|p| p.into_inner()) = rows;
    }
}

fn plan_row(plan: &PodPlan, state: &'static str, reason: Option<String>) -> PodRow {
    let (role_arn, service_account) = match &plan.identity {
        IdentityPlan::Irsa {
            role_arn,
            service_account,
            ..
        } => (Some(role_arn.clone()), Some(service_account.clone())),
        IdentityPlan::PodIdentity {
            service_account, ..
        } => (None, Some(service_account.clone())),
        IdentityPlan::Missing(_) => (None, None),
    };
    PodRow {
        namespace: plan.namespace.clone(),
        name: plan.name.clone(),
        uid: plan.uid.clone(),
        state,
        reason,
        identity: plan.identity.kind(),
        role_arn,
        service_account,
        ips: plan.ips.iter().map(ToString::to_string).collect(),
        traffic: Traffic::default(),
    }
}

impl PodsReport for NodeReport {
    fn pods_json(&self) -> String {
        let rows = self.rows.lock().unwrap_or_else(|p| p.into_inner());
        let pods: Vec<PodRow> = rows
            .iter()
            .map(|r| {
                let mut row = r.row.clone();
                if let Some(counts) = &r.counts {
                    row.traffic = Traffic::read(counts);
                }
                row
            })
            .collect();
        let mut out =
            serde_json::to_string_pretty(&BTreeMap::from([("pods", pods)])).unwrap_or_default();
        out.push('\n');
        out
    }
}
