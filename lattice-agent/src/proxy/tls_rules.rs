//! Which signed requests the proxy sends over TLS, and to which port: the
//! rules of `--upstream-tls-rule` (and, in node mode, of a pod's
//! `upstream-tls` annotation). Pure: parsed and matched without I/O.
//!
//! A rule is `SELECTOR` or `SELECTOR => PORT`:
//!
//! - `*`: every destination;
//! - `port:N`: the original destination's port is N;
//! - `cidr:PREFIX`: its address is in PREFIX (IPv4 or IPv6);
//! - `host:NAME`: the request's host (`Host` or `:authority`, without
//!   the port) is NAME, or ends in `.SUFFIX` for `host:*.SUFFIX` (any
//!   number of labels before it).
//!
//! The first rule that matches decides: the request goes over TLS to the
//! original destination's address, on PORT when given (the app calls
//! `http://svc:80`, the proxy connects to `:443`), else on the port the
//! app called. No rule matching: plain HTTP, as the app sent it. The
//! address is always the original destination's; `Host` only names the
//! TLS server (SNI, and the name its certificate must carry).

use std::net::SocketAddr;

use ipnet::IpNet;

/// An ordered rule set; empty: no TLS.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsRules(Vec<TlsRule>);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsRule {
    selector: Selector,
    /// The upstream port; `None`: the original destination's.
    port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Selector {
    Any,
    Port(u16),
    Cidr(IpNet),
    /// Lower case.
    Host(String),
    /// `.suffix`, lower case: names ending in it.
    HostSuffix(String),
}

/// A rule that does not parse; `origin` names where it came from (the
/// flag, or the annotation).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{origin} {rule:?}")]
pub struct TlsRuleError {
    pub origin: String,
    pub rule: String,
    #[source]
    pub problem: RuleProblem,
}

/// What is wrong with a rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleProblem {
    #[error("empty selector; {FORMS}")]
    EmptySelector,
    #[error("unknown selector {selector:?}; {FORMS}")]
    UnknownSelector { selector: String },
    #[error("{prefix:?} is not an IPv4 or IPv6 prefix (e.g. 10.0.0.0/16)")]
    NotAPrefix {
        prefix: String,
        #[source]
        source: ipnet::AddrParseError,
    },
    #[error("{port:?} is not a port (1-65535)")]
    NotAPort { port: String },
    #[error("{name:?} is not a host name (letters, digits, hyphens and dots; `*.` allowed first)")]
    NotAHostName { name: String },
}

const FORMS: &str = "expected *, port:N, cidr:PREFIX or host:NAME, optionally followed by => PORT";

impl TlsRules {
    /// TLS for every destination, on the port the app called
    /// (`--upstream-tls`).
    pub fn everything() -> Self {
        Self(vec![TlsRule {
            selector: Selector::Any,
            port: None,
        }])
    }

    /// Parses `rules` in order; `origin` names them in errors.
    pub fn parse<S: AsRef<str>>(rules: &[S], origin: &str) -> Result<Self, TlsRuleError> {
        rules
            .iter()
            .map(|r| {
                parse_rule(r.as_ref()).map_err(|problem| TlsRuleError {
                    origin: origin.to_owned(),
                    rule: r.as_ref().trim().to_owned(),
                    problem,
                })
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Self)
    }

    /// A comma-separated list, as an environment variable or an
    /// annotation holds it; blank: no rules.
    pub fn parse_list(list: &str, origin: &str) -> Result<Self, TlsRuleError> {
        let rules: Vec<&str> = list.split(',').filter(|r| !r.trim().is_empty()).collect();
        Self::parse(&rules, origin)
    }

    /// These rules, then `rest`'s.
    pub fn then(mut self, rest: Self) -> Self {
        self.0.extend(rest.0);
        self
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Where a request to `dst` for `host` goes over TLS: the upstream
    /// port, or `None` for plain HTTP.
    pub fn tls_port(&self, dst: SocketAddr, host: &str) -> Option<u16> {
        self.0
            .iter()
            .find(|r| r.selector.matches(dst, host))
            .map(|r| r.port.unwrap_or(dst.port()))
    }
}

impl Selector {
    fn matches(&self, dst: SocketAddr, host: &str) -> bool {
        match self {
            Self::Any => true,
            Self::Port(p) => dst.port() == *p,
            Self::Cidr(net) => net.contains(&dst.ip()),
            Self::Host(name) => host.eq_ignore_ascii_case(name),
            Self::HostSuffix(suffix) => {
                host.len() > suffix.len()
                    && host.is_char_boundary(host.len() - suffix.len())
                    && host[host.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
            }
        }
    }
}

fn parse_rule(rule: &str) -> Result<TlsRule, RuleProblem> {
    let (selector, port) = match rule.split_once("=>") {
        Some((s, p)) => (s.trim(), Some(parse_port(p.trim())?)),
        None => (rule.trim(), None),
    };
    let selector = match selector.split_once(':') {
        _ if selector == "*" => Selector::Any,
        Some(("port", n)) => Selector::Port(parse_port(n.trim())?),
        Some(("cidr", net)) => Selector::Cidr(
            net.trim()
                .parse::<IpNet>()
                .map_err(|source| RuleProblem::NotAPrefix {
                    prefix: net.trim().to_owned(),
                    source,
                })?
                .trunc(),
        ),
        Some(("host", name)) => host_selector(name.trim())?,
        _ if selector.is_empty() => return Err(RuleProblem::EmptySelector),
        _ => {
            return Err(RuleProblem::UnknownSelector {
                selector: selector.to_owned(),
            });
        }
    };
    Ok(TlsRule { selector, port })
}

fn parse_port(p: &str) -> Result<u16, RuleProblem> {
    match p.parse::<u16>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(RuleProblem::NotAPort { port: p.to_owned() }),
    }
}

fn host_selector(name: &str) -> Result<Selector, RuleProblem> {
    let (wildcard, rest) = match name.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, name),
    };
    let valid_label = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if rest.is_empty() || rest.len() > 253 || !rest.split('.').all(valid_label) {
        return Err(RuleProblem::NotAHostName {
            name: name.to_owned(),
        });
    }
    let rest = rest.to_ascii_lowercase();
    Ok(if wildcard {
        Selector::HostSuffix(format!(".{rest}"))
    } else {
        Selector::Host(rest)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const FLAG: &str = "--upstream-tls-rule";

    fn rules(list: &[&str]) -> TlsRules {
        TlsRules::parse(list, FLAG).expect("valid rules")
    }

    fn to(ip_port: &str) -> SocketAddr {
        ip_port.parse().unwrap()
    }

    #[test]
    fn the_eks_https_listener_case() {
        let r = rules(&["host:*.vpc-lattice-svcs.us-west-2.on.aws => 443"]);
        let lattice = to("169.254.171.33:80");
        assert_eq!(
            r.tls_port(
                lattice,
                "svc-0123456789abcdef.7d67968.vpc-lattice-svcs.us-west-2.on.aws"
            ),
            Some(443)
        );
        assert_eq!(
            r.tls_port(lattice, "SVC.7d67968.VPC-LATTICE-SVCS.us-west-2.on.aws"),
            Some(443)
        );
        // The bare suffix, another region, a look-alike: plain HTTP.
        for host in [
            "vpc-lattice-svcs.us-west-2.on.aws",
            "svc.vpc-lattice-svcs.eu-west-1.on.aws",
            "svc.evil-vpc-lattice-svcs.us-west-2.on.aws",
            "billing.internal",
        ] {
            assert_eq!(r.tls_port(lattice, host), None, "{host}");
        }
    }

    #[test]
    fn first_match_decides_and_ports_default_to_the_original() {
        let r = rules(&[
            "host:plain.example => 8080",
            "port:8443",
            "cidr:fd00:ec2:80::/64=>443",
            "cidr:169.254.171.40/32",
        ]);
        assert_eq!(
            r.tls_port(to("169.254.171.33:80"), "plain.example"),
            Some(8080)
        );
        assert_eq!(r.tls_port(to("169.254.171.33:8443"), "a"), Some(8443));
        assert_eq!(r.tls_port(to("[fd00:ec2:80::1]:80"), "a"), Some(443));
        assert_eq!(r.tls_port(to("169.254.171.40:8080"), "a"), Some(8080));
        assert_eq!(r.tls_port(to("169.254.171.41:80"), "a"), None);
        assert_eq!(
            TlsRules::everything().tls_port(to("169.254.171.41:80"), "a"),
            Some(80)
        );
        assert!(TlsRules::default().is_empty());
        assert_eq!(
            rules(&["port:80 => 443"])
                .then(TlsRules::everything())
                .tls_port(to("169.254.171.41:81"), "a"),
            Some(81)
        );
    }

    #[test]
    fn lists_split_on_commas_and_blank_is_none() {
        assert_eq!(
            TlsRules::parse_list("port:80=>443, host:a.example", FLAG).unwrap(),
            rules(&["port:80=>443", "host:a.example"])
        );
        assert!(TlsRules::parse_list(" ", FLAG).unwrap().is_empty());
    }

    #[test]
    fn bad_rules_name_the_flag_the_rule_and_why() {
        for (rule, why) in [
            ("", "empty selector"),
            ("svc.example", "unknown selector"),
            ("port:0", "not a port"),
            ("port:http", "not a port"),
            ("* => 70000", "not a port"),
            ("cidr:10.0.0.0/33", "not an IPv4 or IPv6 prefix"),
            ("host:", "not a host name"),
            ("host:*", "not a host name"),
            ("host:bad_name.example", "not a host name"),
            ("host:a..b", "not a host name"),
        ] {
            let e = TlsRules::parse(&[rule], FLAG).unwrap_err();
            assert_eq!(e.to_string(), format!("{FLAG} {rule:?}"));
            let text = crate::error_chain(&e);
            assert!(
                text.starts_with(&format!("{FLAG} {rule:?}: ")) && text.contains(why),
                "{rule:?}: {text}"
            );
        }
    }
}
