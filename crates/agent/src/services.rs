//! Services as the agent's API changes them (a lab, a user; in Kubernetes
//! mode the API server's Services and EndpointSlices instead, through
//! `kubernetes`): checked, then committed (`lb_sync` writes the datapath's
//! load balancer).

use std::sync::Arc;

use crate::control::Control;
use crate::state::State;
use crate::{invalid, Error};

const FROM_KUBERNETES: &str = "services come from the Kubernetes API on this node (--k8s-kubeconfig-path): change them with kubectl";

pub struct Services {
    control: Arc<Control>,
    from_kubernetes: bool,
}

impl Services {
    pub fn new(control: Arc<Control>, from_kubernetes: bool) -> Self {
        Services {
            control,
            from_kubernetes,
        }
    }

    pub fn list(&self) -> Vec<api::Service> {
        self.control.lock().services().values().cloned().collect()
    }

    /// Adds or replaces a service: refused, changing nothing, when it is
    /// malformed or names an address and port another service answers on.
    pub fn upsert(&self, svc: api::Service) -> Result<(), Error> {
        if self.from_kubernetes {
            return Err(Error::Conflict(FROM_KUBERNETES.into()));
        }
        svc.validate().map_err(invalid)?;
        let mut s = self.control.lock();
        check_frontends(&mut s, &svc)?;
        if s.upsert_service(svc) {
            self.control.commit(&mut s)?;
        }
        Ok(())
    }

    pub fn delete(&self, namespace: &str, name: &str) -> Result<(), Error> {
        if self.from_kubernetes {
            return Err(Error::Conflict(FROM_KUBERNETES.into()));
        }
        let mut s = self.control.lock();
        if s.remove_service(&format!("{namespace}/{name}")).is_none() {
            return Err(Error::NotFound(format!("no service {namespace}/{name}")));
        }
        self.control.commit(&mut s)
    }
}

/// A frontend (address, port, protocol) belongs to one service only.
pub fn check_frontends(s: &mut State, svc: &api::Service) -> Result<(), Error> {
    match s.frontend_taken(svc) {
        Some(((address, port, protocol), other)) => Err(Error::Conflict(format!(
            "{address}:{port}/{protocol} is already service {other}'s"
        ))),
        None => Ok(()),
    }
}
