//! The request headers Milvus and its SDKs give a meaning to. Names parsed once, here: a
//! lookup by `&str` validates and lowercases the name on every call (`http`'s `parse_hdr`,
//! about 1 % of a forwarded Search's instructions).

use http::HeaderName;

/// The database a call is about, when its body names none (pymilvus sends it on every call).
pub const DBNAME: HeaderName = HeaderName::from_static("dbname");
/// pymilvus's id for the call, new on every call.
pub const CLIENT_REQUEST_ID: HeaderName = HeaderName::from_static("client-request-id");
/// pymilvus's clock when it sent the call, new on every call.
pub const CLIENT_REQUEST_UNIXMSEC: HeaderName = HeaderName::from_static("client-request-unixmsec");
/// Set by Milvus's own cluster members; with it a caller skips Milvus's authentication.
pub const SOURCEID: HeaderName = HeaderName::from_static("sourceid");
