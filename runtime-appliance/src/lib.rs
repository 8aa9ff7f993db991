//! `tetherd`, the appliance runtime: accepts links from many VMs.
//!
//! Stub: the runtime is planned (issue "tether and tetherd") and not built yet.
