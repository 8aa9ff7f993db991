//! VM fork (docs/PROTOCOL.md section 4.5): the identity a hypervisor gives each
//! VM, how a guest knows it is a child, and the quiesce and recovery plans as
//! ordered steps behind an [`Effects`] trait.
//!
//! Like proto-core this crate does no I/O of its own: the guest runtime
//! implements [`Effects`] with the real system calls, and the tests here
//! implement it with a recorder, so the order of the steps and what happens
//! when one fails are checked without root or a VM.

mod identity;
mod plan;
pub mod vmware;

pub use identity::{Addressing, IDENTITY_SIZE, Identity, IdentityError, Nic, Role};
pub use plan::{Effects, Failure, Recovery, quiesce, recover, resume};
