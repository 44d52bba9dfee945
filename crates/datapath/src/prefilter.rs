//! The XDP prefilter (`bpf/xdp.bpf.c`, Cilium's prefilter): source
//! prefixes dropped on a device before the stack, its counters, and its
//! attachment (a pinned link, replaced in place by a successor, so the
//! device is never left unfiltered while the agent restarts).

use std::net::Ipv4Addr;

use abi::PrefilterValue;
use aya::maps::lpm_trie::Key;
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::xdp::XdpLink;
use aya::programs::{Xdp, XdpMode};

use crate::{map_err, pinned_loader, prog_err, program, Datapath, Error};

/// The compiled `bpf/xdp.bpf.c`, embedded at build time.
static XDP_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/xdp.bpf.o"));

pub(crate) const MAP_PREFILTER: &str = "fibril_prefilter";
pub(crate) const MAP_PREFILTER_STATS: &str = "fibril_prefilter_stats";
const PROG_PREFILTER: &str = "xdp_prefilter";

/// How the prefilter runs on its device: in the driver (`native`, before
/// any skb exists) or in the stack's generic XDP hook (`generic`, for
/// devices without native support).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrefilterMode {
    Native,
    Generic,
}

impl PrefilterMode {
    fn xdp(self) -> XdpMode {
        match self {
            PrefilterMode::Native => XdpMode::Driver,
            PrefilterMode::Generic => XdpMode::Skb,
        }
    }
}

/// The prefilter's counters, summed over the CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PrefilterCounters {
    pub dropped_packets: u64,
    pub dropped_bytes: u64,
    pub passed_packets: u64,
}

impl Datapath {
    /// Attaches the prefilter to `ifname` (replacing the program of an
    /// earlier run's link in place).
    pub fn attach_prefilter(&self, ifname: &str, mode: PrefilterMode) -> Result<(), Error> {
        let links = self.config.pin_dir.join("links");
        std::fs::create_dir_all(&links).map_err(|source| Error::PinDir {
            path: links.clone(),
            source,
        })?;
        let pin = links.join(format!("{ifname}_{PROG_PREFILTER}"));
        let mut bpf = pinned_loader(&self.config).load(XDP_OBJECT)?;
        let prog: &mut Xdp = program(&mut bpf, PROG_PREFILTER)?;
        prog.load().map_err(prog_err(PROG_PREFILTER))?;
        let link_err = |message: String| Error::Link {
            path: pin.clone(),
            message,
        };
        let id = match PinnedLink::from_pin(&pin) {
            Ok(old) => {
                let link =
                    XdpLink::try_from(FdLink::from(old)).map_err(|e| link_err(format!("{e}")))?;
                // The old pin is replaced below by the same link.
                std::fs::remove_file(&pin).ok();
                prog.attach_to_link(link)
                    .map_err(prog_err(PROG_PREFILTER))?
            }
            Err(_) => prog
                .attach(ifname, mode.xdp())
                .map_err(prog_err(PROG_PREFILTER))?,
        };
        let link = prog.take_link(id).map_err(prog_err(PROG_PREFILTER))?;
        let fd_link: FdLink = link.try_into().map_err(|e| link_err(format!("{e}")))?;
        fd_link.pin(&pin).map_err(|e| link_err(format!("{e}")))?;
        Ok(())
    }

    /// Detaches the prefilter from `ifname` (removing the pin drops the
    /// link).
    pub fn detach_prefilter(&self, ifname: &str) {
        let pin = self
            .config
            .pin_dir
            .join("links")
            .join(format!("{ifname}_{PROG_PREFILTER}"));
        std::fs::remove_file(pin).ok();
    }

    /// Adds and removes source prefixes (address, prefix length).
    pub fn prefilter_update(
        &self,
        add: &[(Ipv4Addr, u32)],
        remove: &[(Ipv4Addr, u32)],
    ) -> Result<(), Error> {
        let mut maps = self.maps();
        for &(addr, len) in add {
            let key = Key::new(len, u32::from(addr).to_be());
            maps.prefilter
                .insert(&key, PrefilterValue::default(), 0)
                .map_err(map_err(MAP_PREFILTER))?;
        }
        for &(addr, len) in remove {
            let key = Key::new(len, u32::from(addr).to_be());
            match maps.prefilter.remove(&key) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(MAP_PREFILTER)(e)),
            }
        }
        Ok(())
    }

    /// The listed source prefixes, in address order.
    pub fn prefilter_entries(&self) -> Result<Vec<(Ipv4Addr, u32)>, Error> {
        let maps = self.maps();
        let mut out = Vec::new();
        for item in maps.prefilter.iter() {
            let (k, _) = item.map_err(map_err(MAP_PREFILTER))?;
            out.push((Ipv4Addr::from(u32::from_be(k.data())), k.prefix_len()));
        }
        out.sort();
        Ok(out)
    }

    /// What the prefilter has dropped and passed, summed over the CPUs.
    pub fn prefilter_counters(&self) -> Result<PrefilterCounters, Error> {
        let maps = self.maps();
        let per_cpu = maps
            .prefilter_stats
            .get(&0, 0)
            .map_err(map_err(MAP_PREFILTER_STATS))?;
        Ok(per_cpu
            .iter()
            .fold(PrefilterCounters::default(), |mut c, s| {
                c.dropped_packets += s.dropped_packets;
                c.dropped_bytes += s.dropped_bytes;
                c.passed_packets += s.passed_packets;
                c
            }))
    }
}

/// The prefilter program loaded but not attached: tests and the benchmark
/// run packets through it with BPF_PROG_TEST_RUN.
pub struct PrefilterProgram {
    bpf: aya::Ebpf,
}

impl Datapath {
    /// Loads the prefilter program against this datapath's maps.
    pub fn load_prefilter_program(&self) -> Result<PrefilterProgram, Error> {
        let mut bpf = pinned_loader(&self.config).load(XDP_OBJECT)?;
        let prog: &mut Xdp = program(&mut bpf, PROG_PREFILTER)?;
        prog.load().map_err(prog_err(PROG_PREFILTER))?;
        Ok(PrefilterProgram { bpf })
    }
}

impl PrefilterProgram {
    /// Runs `packet` (an Ethernet frame) `repeat` times: the XDP action
    /// (1 = XDP_DROP, 2 = XDP_PASS) and the kernel's mean time per run.
    pub fn test_run(&mut self, packet: &[u8], repeat: u32) -> Result<crate::TestRunOutcome, Error> {
        use aya::programs::TestRun;
        let prog: &mut Xdp = program(&mut self.bpf, PROG_PREFILTER)?;
        crate::test_run_with(PROG_PREFILTER, packet, repeat, |opts| prog.test_run(opts))
    }
}
