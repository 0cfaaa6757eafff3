//! What the plugin does for ADD, CHECK, DEL and STATUS.

use std::{fs::File, os::fd::AsFd as _, time::Duration};

use serde_json::Value;

use super::{
    agent::{self, AgentError},
    env::{CONTAINER_ID, Env, IFNAME, NETNS},
    error::{CniError, Code, describe},
    netconf::NetConf,
    warn,
};
use crate::{
    conf::FailurePolicy,
    protocol::{Command, Reply, Request},
};

/// DEL waits at most this long: the pod is going away either way, and the
/// agent also forgets pods that leave the API.
const DEL_TIMEOUT: Duration = Duration::from_secs(3);

/// Has the agent enroll the pod, then passes the previous result on.
pub fn add(env: &Env, conf: &NetConf) -> Result<Value, CniError> {
    let result = conf.passthrough()?;
    if let Some(request) = request(env, conf, Command::Add)? {
        enroll(conf, &request)?;
    }
    Ok(result)
}

/// Has the agent confirm the pod is enrolled.
pub fn check(env: &Env, conf: &NetConf) -> Result<(), CniError> {
    conf.prev_result()?;
    if let Some(request) = request(env, conf, Command::Check)? {
        enroll(conf, &request)?;
    }
    Ok(())
}

/// Tells the agent the pod is gone. The caller only logs the error: DEL
/// must not fail.
pub fn del(env: &Env, stdin: &[u8]) -> Result<(), CniError> {
    let conf = NetConf::parse(stdin)?;
    let Some(request) = request(env, &conf, Command::Del)? else {
        return Ok(());
    };
    let timeout = conf.timeout().min(DEL_TIMEOUT);
    match agent::ask(&conf.plugin.socket, timeout, &request, None) {
        Ok(reply) => refused(reply),
        Err(err) => Err(CniError::new(
            Code::TryAgainLater,
            format!("lattice node agent unreachable: {}", describe(&err)),
        )),
    }
}

/// Whether the agent accepts connections; with failurePolicy ignore the
/// plugin is always available.
pub fn status(conf: &NetConf) -> Result<(), CniError> {
    let Err(err) = agent::probe(&conf.plugin.socket, conf.timeout()) else {
        return Ok(());
    };
    let why = format!("lattice node agent not available: {}", describe(&err));
    match conf.plugin.failure_policy {
        FailurePolicy::Fail => Err(CniError::new(Code::NotAvailable, why).with_details(
            "failurePolicy fail: pods are not set up until the node agent serves its socket",
        )),
        FailurePolicy::Ignore => {
            warn(format!("STATUS: {why} (failurePolicy ignore)"));
            Ok(())
        }
    }
}

/// The request for the agent, or `None` when the agent is not asked: not
/// a Kubernetes pod, or one of an exempt namespace.
fn request(env: &Env, conf: &NetConf, command: Command) -> Result<Option<Request>, CniError> {
    let container_id = env.require(CONTAINER_ID)?;
    // DEL: the namespace may already be gone.
    let netns = if command == Command::Del {
        env.get(NETNS).unwrap_or_default()
    } else {
        env.require(IFNAME)?;
        env.require(NETNS)?
    };
    let Some(pod) = env.pod()? else {
        return Ok(None);
    };
    if conf.is_exempt(&pod.namespace) {
        return Ok(None);
    }
    Ok(Some(Request {
        command,
        container_id: container_id.to_owned(),
        netns: netns.to_owned(),
        pod_namespace: pod.namespace,
        pod_name: pod.name,
        pod_uid: pod.uid,
    }))
}

/// ADD, CHECK: asks the agent, with the pod's network namespace alongside.
fn enroll(conf: &NetConf, request: &Request) -> Result<(), CniError> {
    let netns = File::open(&request.netns).map_err(|e| {
        CniError::new(
            Code::Io,
            format!("cannot open {NETNS} {}: {e}", request.netns),
        )
    })?;
    match agent::ask(
        &conf.plugin.socket,
        conf.timeout(),
        request,
        Some(netns.as_fd()),
    ) {
        Ok(reply) => refused(reply),
        Err(err) => unreachable(conf, request, &err),
    }
}

/// The agent's error, if it answered with one.
fn refused(reply: Reply) -> Result<(), CniError> {
    match reply.error {
        Some(error) => Err(CniError::new(
            Code::AgentRefused,
            format!("lattice node agent: {error}"),
        )),
        None => Ok(()),
    }
}

/// The agent could not be asked: fail (the runtime retries) or, with
/// failurePolicy ignore, let the pod start un-intercepted.
fn unreachable(conf: &NetConf, request: &Request, err: &AgentError) -> Result<(), CniError> {
    let why = format!("lattice node agent unreachable: {}", describe(err));
    match conf.plugin.failure_policy {
        FailurePolicy::Fail => Err(CniError::new(Code::TryAgainLater, why).with_details(
            "failurePolicy fail: pods that may call VPC Lattice do not start un-intercepted; \
             the kubelet retries the pod sandbox",
        )),
        FailurePolicy::Ignore => {
            warn(format!(
                "{} {}/{}: {why}; failurePolicy ignore: the pod starts un-intercepted",
                command_name(request.command),
                request.pod_namespace,
                request.pod_name
            ));
            Ok(())
        }
    }
}

fn command_name(command: Command) -> &'static str {
    match command {
        Command::Add => "ADD",
        Command::Del => "DEL",
        Command::Check => "CHECK",
    }
}
