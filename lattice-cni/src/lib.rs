//! `lattice-cni`: a chained CNI plugin that has the node agent intercept a
//! pod's VPC Lattice connects before the pod's first container runs.
//!
//! - [`protocol`]: the plugin's exchange with the node agent, framed as
//!   [`frame`] says (as is the agents' own handover protocol);
//! - [`conf`]: putting the plugin into (and out of) the node's CNI
//!   configuration, which the node agent does;
//! - [`plugin`]: what the plugin binary does for each CNI command.

pub mod conf;
pub mod frame;
pub mod plugin;
pub mod protocol;
