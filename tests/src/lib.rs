//! End-to-end test support for Gantry: the real-guest fixture
//! ([`fixture::TestAgent`], [`fixture::TestVm`]) and the host side of the
//! test guest's console and exec channel ([`guest`]).

pub mod fixture;
pub mod guest;
