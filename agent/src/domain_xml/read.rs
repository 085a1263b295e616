//! Reading back what libvirt prints of a domain (live or persistent XML):
//! the group NIC, the disks' targets and sources. Anything that does not
//! parse reads as absent, never as a guess.

use super::GROUP_TAP_PREFIX;
use crate::net::InterfaceDef;
use quick_xml::events::Event;
use std::path::PathBuf;

/// The group NIC in a domain's XML (live or persistent, as libvirt prints
/// it): the `<interface>` whose target starts with [`GROUP_TAP_PREFIX`].
/// `None` when there is none or the XML does not parse.
pub fn group_interface(xml: &str) -> Option<InterfaceDef> {
    let mut r = quick_xml::Reader::from_str(xml);
    /// What the current `<interface>` says so far.
    #[derive(Default)]
    struct Seen {
        mac: Option<String>,
        tap: Option<String>,
        bridge: Option<String>,
        mtu: Option<u16>,
    }
    let mut cur: Option<Seen> = None;
    loop {
        let e = match r.read_event().ok()? {
            Event::Eof => return None,
            Event::End(e) if e.name().as_ref() == b"interface" => {
                if let Some(Seen {
                    mac: Some(mac),
                    tap: Some(tap),
                    bridge,
                    mtu,
                }) = cur.take()
                {
                    if tap.starts_with(GROUP_TAP_PREFIX) {
                        return Some(InterfaceDef {
                            mac: mac.parse().ok()?,
                            tap,
                            bridge,
                            mtu,
                        });
                    }
                }
                continue;
            }
            Event::Start(e) if e.name().as_ref() == b"interface" => {
                cur = Some(Seen::default());
                continue;
            }
            Event::Start(e) | Event::Empty(e) => e,
            _ => continue,
        };
        let Some(c) = cur.as_mut() else { continue };
        let attr = |k: &[u8]| {
            e.attributes()
                .flatten()
                .find(|a| a.key.as_ref() == k)
                .and_then(|a| a.unescape_value().ok().map(|v| v.into_owned()))
        };
        match e.name().as_ref() {
            b"mac" if c.mac.is_none() => c.mac = attr(b"address"),
            b"target" if c.tap.is_none() => c.tap = attr(b"dev"),
            b"source" if c.bridge.is_none() => c.bridge = attr(b"bridge"),
            b"mtu" => c.mtu = attr(b"size").and_then(|v| v.parse().ok()),
            _ => {}
        }
    }
}

/// The targets of every disk in a domain's XML (`vda`, `vdb`, ...).
pub fn disk_targets(xml: &str) -> Vec<String> {
    let mut r = quick_xml::Reader::from_str(xml);
    let (mut out, mut in_disk) = (Vec::new(), false);
    loop {
        match r.read_event() {
            Ok(Event::Start(e)) if e.name().as_ref() == b"disk" => in_disk = true,
            Ok(Event::End(e)) if e.name().as_ref() == b"disk" => in_disk = false,
            Ok(Event::Empty(e)) | Ok(Event::Start(e))
                if in_disk && e.name().as_ref() == b"target" =>
            {
                if let Some(a) = e.attributes().flatten().find(|a| a.key.as_ref() == b"dev") {
                    if let Ok(v) = a.unescape_value() {
                        out.push(v.into_owned());
                    }
                }
            }
            Ok(Event::Eof) | Err(_) => return out,
            _ => {}
        }
    }
}

/// The source file of the disk with target `dev` in a domain's XML (as
/// libvirt prints it): the layer the guest uses now (not one of its
/// `backingStore` layers).
pub fn disk_source(xml: &str, dev: &str) -> Option<PathBuf> {
    let mut r = quick_xml::Reader::from_str(xml);
    // Depth inside the current <disk>; None outside one.
    let mut depth: Option<usize> = None;
    let (mut source, mut target) = (None, None);
    loop {
        let (e, opens) = match r.read_event().ok()? {
            Event::Eof => return None,
            Event::Start(e) => (e, true),
            Event::Empty(e) => (e, false),
            Event::End(e) => {
                match (e.name().as_ref(), depth) {
                    (b"disk", Some(0)) => {
                        if target.as_deref() == Some(dev) {
                            return source.map(PathBuf::from);
                        }
                        depth = None;
                    }
                    (_, Some(d)) => depth = Some(d.saturating_sub(1)),
                    _ => {}
                }
                continue;
            }
            _ => continue,
        };
        let attr = |k: &[u8]| {
            e.attributes()
                .flatten()
                .find(|a| a.key.as_ref() == k)
                .and_then(|a| a.unescape_value().ok().map(|v| v.into_owned()))
        };
        match (e.name().as_ref(), depth) {
            (b"disk", None) if opens => {
                (depth, source, target) = (Some(0), None, None);
                continue;
            }
            (b"source", Some(0)) if source.is_none() => source = attr(b"file"),
            (b"target", Some(0)) => target = attr(b"dev"),
            _ => {}
        }
        if opens {
            depth = depth.map(|d| d + 1);
        }
    }
}
