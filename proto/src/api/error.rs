//! The JSON error body every Gantry API answers with on 4xx and 5xx.

use serde::{Deserialize, Serialize};

/// `{"error": "sentence", "field": "name"}`; `field` is set when one input
/// field is to blame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorBody {
    pub error: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}
