//! The host firewall's programs (`bpf/host.bpf.c`, Cilium's `bpf_host`
//! for host policies) on the node's devices, and the host endpoint's flags
//! (`fibril_host`) that switch it on, enforce its directions and put it in
//! audit mode. Links are pinned like the endpoints' (replaced in place by
//! a successor), so the node stays enforced while the agent restarts.

use abi::HostEndpoint;
use aya::programs::TcAttachType;

use crate::{attach_pinned, classifier, knobs, map_err, pinned_loader, prog_err, Datapath, Error};

/// The compiled `bpf/host.bpf.c`.
static HOST_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/host.bpf.o"));

pub(crate) const MAP_HOST: &str = "fibril_host";
const PROG_FROM_NETDEV: &str = "from_netdev";
const PROG_TO_NETDEV: &str = "to_netdev";
const PROGRAMS: [(&str, TcAttachType); 2] = [
    (PROG_FROM_NETDEV, TcAttachType::Ingress),
    (PROG_TO_NETDEV, TcAttachType::Egress),
];

/// Which of the host programs.
#[derive(Clone, Copy, Debug)]
pub enum NetdevHook {
    /// Packets arriving on the device (the host's ingress).
    FromNetdev,
    /// Packets leaving by the device (the host's egress).
    ToNetdev,
}

impl NetdevHook {
    fn program(self) -> &'static str {
        match self {
            NetdevHook::FromNetdev => PROG_FROM_NETDEV,
            NetdevHook::ToNetdev => PROG_TO_NETDEV,
        }
    }
}

impl Datapath {
    /// Attaches the host programs to the node's device `ifname` (tc
    /// ingress and egress), replacing the programs of an earlier run's
    /// links in place.
    pub fn attach_host_programs(&self, ifname: &str) -> Result<(), Error> {
        let links = self.config.pin_dir.join("links");
        std::fs::create_dir_all(&links).map_err(|source| Error::PinDir {
            path: links.clone(),
            source,
        })?;
        let mut progs = self.load_host_programs()?;
        for (name, attach) in PROGRAMS {
            attach_pinned(
                &mut progs.bpf,
                name,
                ifname,
                attach,
                &links.join(format!("{ifname}_{name}")),
            )?;
        }
        Ok(())
    }

    /// Detaches the host programs from `ifname` (removing the pins drops
    /// the links).
    pub fn detach_host_programs(&self, ifname: &str) {
        for (name, _) in PROGRAMS {
            let pin = self
                .config
                .pin_dir
                .join("links")
                .join(format!("{ifname}_{name}"));
            std::fs::remove_file(pin).ok();
        }
    }

    /// Sets the host endpoint's flags (`EP_F_*`; 0: no host firewall).
    pub fn set_host_endpoint(&self, flags: u32) -> Result<(), Error> {
        let mut maps = self.maps();
        maps.host
            .set(0, HostEndpoint { flags, pad: 0 }, 0)
            .map_err(map_err(MAP_HOST))
    }

    /// The host endpoint's flags as the kernel holds them.
    pub fn host_endpoint(&self) -> Result<u32, Error> {
        let maps = self.maps();
        Ok(maps.host.get(&0, 0).map_err(map_err(MAP_HOST))?.flags)
    }

    /// Loads the host programs against this datapath's maps, without
    /// attaching them (tests run packets through them).
    pub fn load_host_programs(&self) -> Result<HostPrograms, Error> {
        // The load-time settings its libraries read (no proxy, no tunnel).
        let mut l = pinned_loader(&self.config);
        knobs::set(
            &mut l,
            knobs::EVENTS_WAKEUP_BYTES,
            &self.config.events_wakeup_bytes,
        );
        knobs::set(
            &mut l,
            knobs::CT_ENDPOINT_BUDGET,
            &self.config.ct_endpoint_budget,
        );
        knobs::set(
            &mut l,
            knobs::LB_MAGLEV_TABLE_SIZE,
            &self.config.maglev_table_size,
        );
        let kpr = u32::from(self.config.kube_proxy_replacement);
        knobs::set(&mut l, knobs::KUBE_PROXY_REPLACEMENT, &kpr);
        let snat = u32::from(self.config.nodeport_snat_address).to_be();
        knobs::set(&mut l, knobs::NODEPORT_SNAT_ADDR, &snat);
        let mut bpf = l.load(HOST_OBJECT)?;
        for (name, _) in PROGRAMS {
            classifier(&mut bpf, name)?.load().map_err(prog_err(name))?;
        }
        Ok(HostPrograms { bpf })
    }
}

/// The host programs, loaded.
pub struct HostPrograms {
    bpf: aya::Ebpf,
}

impl HostPrograms {
    /// Runs one Ethernet frame through a host program with
    /// BPF_PROG_TEST_RUN.
    pub fn test_run(
        &mut self,
        hook: NetdevHook,
        packet: &[u8],
    ) -> Result<crate::TestRunOutcome, Error> {
        self.test_run_marked(hook, packet, None)
    }

    /// `test_run` with the packet carrying `mark` (given: the outcome has
    /// the mark the program left).
    pub fn test_run_marked(
        &mut self,
        hook: NetdevHook,
        packet: &[u8],
        mark: Option<u32>,
    ) -> Result<crate::TestRunOutcome, Error> {
        use aya::programs::TestRun;
        let name = hook.program();
        let prog = classifier(&mut self.bpf, name)?;
        crate::test_run_marked(name, packet, 1, mark, |opts| prog.test_run(opts))
    }
}
