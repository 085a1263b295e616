//! End-to-end test support for Gantry: the real-guest fixture
//! ([`fixture::TestAgent`], [`fixture::TestVm`]) and the host side of the
//! test guest's console and exec channel ([`guest`]), and a real controller
//! process ([`controller::TestController`]) and a whole small cloud of
//! both ([`cloud::Cloud`]); network namespaces for tests ([`netns`]); the
//! running time of libvirt domains from libvirt's own events
//! ([`domain_clock`]); the Monitor view and promtool checks ([`monitor`]).

pub mod cloud;
pub mod controller;
pub mod domain_clock;
pub mod fixture;
pub mod guest;
pub mod https;
pub mod monitor;
pub mod netns;
pub mod ssh;
pub mod ticks;
pub mod webdriver;
