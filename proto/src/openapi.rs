//! OpenAPI schemas (feature `openapi`) of the types whose JSON form is a
//! string written by hand: ids (`ins-<32 hex>`), PCI, MAC and subnet
//! addresses. Everything else derives `utoipa::ToSchema` next to its serde
//! derive.

use crate::ids::*;
use crate::net::{Ipv4Net, MacAddr};
use crate::validate::PciAddress;
use std::borrow::Cow;
use utoipa::openapi::schema::{ObjectBuilder, Schema, SchemaType, Type};
use utoipa::openapi::RefOr;
use utoipa::{PartialSchema, ToSchema};

/// A string schema with a pattern and an example.
fn string(description: &str, pattern: &str, example: &str) -> RefOr<Schema> {
    ObjectBuilder::new()
        .schema_type(SchemaType::new(Type::String))
        .description(Some(description))
        .pattern(Some(pattern))
        .examples([example])
        .into()
}

macro_rules! string_schema {
    ($ty:ty, $name:expr, $desc:expr, $pattern:expr, $example:expr) => {
        impl PartialSchema for $ty {
            fn schema() -> RefOr<Schema> {
                string($desc, $pattern, $example)
            }
        }
        impl ToSchema for $ty {
            fn name() -> Cow<'static, str> {
                Cow::Borrowed($name)
            }
        }
    };
}

macro_rules! id_schema {
    ($($ty:ident),* $(,)?) => {$(
        string_schema!(
            $ty,
            stringify!($ty),
            concat!("A ", stringify!($ty), ": its prefix, a dash and 32 lower-case hex digits"),
            &format!("^{}-[0-9a-f]{{32}}$", $ty::PREFIX),
            &format!("{}-0190b4c2e7a47c3a9d2b8f1e4a6c0d12", $ty::PREFIX)
        );
    )*};
}

id_schema!(
    InstanceId,
    HostId,
    AccountId,
    SnapshotId,
    ImageId,
    VolumeId,
    FlavorId,
    OperationId,
    TokenId,
    JoinTokenId,
    ForwardId,
    SshKeyId,
    NetworkGroupId,
    StorageConnectionId,
);

string_schema!(
    PciAddress,
    "PciAddress",
    "A PCI address, domain:bus:slot.function in lower-case hex",
    "^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\\.[0-7]$",
    "0000:41:00.0"
);
string_schema!(
    MacAddr,
    "MacAddr",
    "An Ethernet address in lower case",
    "^[0-9a-f]{2}(:[0-9a-f]{2}){5}$",
    "52:54:00:0a:c8:02"
);
string_schema!(
    Ipv4Net,
    "Ipv4Net",
    "An IPv4 address with its prefix length",
    "^[0-9]{1,3}(\\.[0-9]{1,3}){3}/[0-9]{1,2}$",
    "10.200.0.1/24"
);
