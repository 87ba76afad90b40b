//! The `ModelDeployment` CRD, validation, topology planning and reconcile.
//! Empty until the operator issue fills it.
