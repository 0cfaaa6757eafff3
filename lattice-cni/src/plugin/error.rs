//! The plugin's errors as the CNI spec wants them: a code, a short message
//! and optional details, printed as JSON on stdout (exit status 1).

use serde_json::{Value, json};

use super::netconf::LATEST_VERSION;

/// The CNI spec's well-known error codes (0-99) and the plugin's own (100+).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    IncompatibleVersion = 1,
    InvalidEnvironment = 4,
    Io = 5,
    Decode = 6,
    InvalidConfig = 7,
    /// A transient condition: the runtime may retry (the agent unreachable).
    TryAgainLater = 11,
    /// STATUS: the plugin cannot serve ADD now.
    NotAvailable = 50,
    /// The agent answered with an error.
    AgentRefused = 100,
}

/// A failed call, as printed for the runtime.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{msg}")]
pub struct CniError {
    pub code: Code,
    pub msg: String,
    pub details: Option<String>,
    /// The configuration's `cniVersion`, once known.
    cni_version: Option<String>,
}

impl CniError {
    pub fn new(code: Code, msg: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: None,
            cni_version: None,
        }
    }

    pub fn with_details(mut self, details: impl Into<String>) -> Self {
        self.details = Some(details.into());
        self
    }

    /// Answer in the configuration's CNI version (the spec: the error's
    /// `cniVersion` is the one the runtime sent), unless one is set.
    pub fn in_version(mut self, cni_version: &str) -> Self {
        self.cni_version
            .get_or_insert_with(|| cni_version.to_owned());
        self
    }

    /// The error object for stdout; before the configuration is read, in
    /// the newest version the plugin speaks.
    pub fn to_json(&self) -> Value {
        let mut out = json!({
            "cniVersion": self.cni_version.as_deref().unwrap_or(LATEST_VERSION),
            "code": self.code as u32,
            "msg": self.msg,
        });
        if let Some(details) = &self.details {
            out["details"] = Value::String(details.clone());
        }
        out
    }
}

/// `err` and its sources, joined with ": ".
pub fn describe(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_has_the_spec_fields() {
        let err = CniError::new(Code::InvalidEnvironment, "CNI_NETNS is not set");
        assert_eq!(
            err.to_json(),
            json!({"cniVersion": "1.1.0", "code": 4, "msg": "CNI_NETNS is not set"})
        );
        let err = CniError::new(Code::TryAgainLater, "agent unreachable")
            .with_details("the kubelet retries")
            .in_version("0.4.0")
            .in_version("1.0.0");
        assert_eq!(
            err.to_json(),
            json!({
                "cniVersion": "0.4.0",
                "code": 11,
                "msg": "agent unreachable",
                "details": "the kubelet retries"
            }),
            "the first version set stays"
        );
    }

    #[test]
    fn describe_follows_the_sources() {
        #[derive(Debug, thiserror::Error)]
        #[error("cannot connect to /run/x.sock")]
        struct Outer(#[source] std::io::Error);
        let err = Outer(std::io::Error::from(std::io::ErrorKind::NotFound));
        assert_eq!(
            describe(&err),
            "cannot connect to /run/x.sock: entity not found"
        );
    }
}
