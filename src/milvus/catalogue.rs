//! The RPCs the sidecar inspects, and the shape of their requests and replies.
//!
//! Every other method (including ones newer than this build) is forwarded as raw
//! HTTP/2 without being decoded.

/// Path prefix of every `MilvusService` method.
pub const SERVICE_PREFIX: &str = "/milvus.proto.milvus.MilvusService/";

macro_rules! rpcs {
    ($($name:ident => $request:ident, $reply:ident;)*) => {
        /// A `MilvusService` method the sidecar reads through a view.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum Rpc { $($name),* }

        impl Rpc {
            pub const ALL: &'static [Rpc] = &[$(Rpc::$name),*];

            /// The method's name as it appears in the gRPC path.
            pub const fn name(self) -> &'static str {
                match self { $(Rpc::$name => stringify!($name)),* }
            }

            pub const fn request(self) -> Request {
                match self { $(Rpc::$name => Request::$request),* }
            }

            pub const fn reply(self) -> Reply {
                match self { $(Rpc::$name => Reply::$reply),* }
            }

            fn from_name(name: &str) -> Option<Rpc> {
                match name { $(stringify!($name) => Some(Rpc::$name),)* _ => None }
            }
        }
    };
}

rpcs! {
    Search => Search, SearchResults;
    HybridSearch => HybridSearch, SearchResults;
    Query => Query, QueryResults;
    Insert => Insert, Mutation;
    Upsert => Insert, Mutation;
    Delete => Delete, Mutation;
    Import => Import, StatusField;
    CreateCollection => CreateCollection, BareStatus;
    DropCollection => Collection, BareStatus;
    AlterCollection => Collection, BareStatus;
    RenameCollection => RenameCollection, BareStatus;
    LoadCollection => Collection, BareStatus;
    ReleaseCollection => Collection, BareStatus;
    CreatePartition => Partition, BareStatus;
    DropPartition => Partition, BareStatus;
    LoadPartitions => Partitions, BareStatus;
    ReleasePartitions => Partitions, BareStatus;
    DescribeCollection => Collection, StatusField;
    CreateIndex => CreateIndex, BareStatus;
    AlterIndex => AlterIndex, BareStatus;
    DropIndex => IndexName, BareStatus;
    DescribeIndex => IndexName, DescribeIndex;
    CreateDatabase => Database, BareStatus;
    DropDatabase => Database, BareStatus;
}

/// Which view a request is read through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    Search,
    HybridSearch,
    Query,
    Insert,
    Delete,
    Import,
    CreateCollection,
    RenameCollection,
    Collection,
    Partition,
    Partitions,
    CreateIndex,
    AlterIndex,
    IndexName,
    Database,
}

impl Request {
    /// The message in `proto/views.proto` this request is read as.
    pub const fn view(self) -> &'static str {
        match self {
            Request::Search => "SearchRequest",
            Request::HybridSearch => "HybridSearchRequest",
            Request::Query => "QueryRequest",
            Request::Insert => "InsertRequest",
            Request::Delete => "DeleteRequest",
            Request::Import => "ImportRequest",
            Request::CreateCollection => "CreateCollectionRequest",
            Request::RenameCollection => "RenameCollectionRequest",
            Request::Collection => "CollectionRequest",
            Request::Partition => "PartitionRequest",
            Request::Partitions => "PartitionsRequest",
            Request::CreateIndex => "CreateIndexRequest",
            Request::AlterIndex => "AlterIndexRequest",
            Request::IndexName => "IndexNameRequest",
            Request::Database => "DatabaseRequest",
        }
    }

    /// Length-delimited fields of the request that hold its bulk and that its view does
    /// not read: the sidecar streams them through rather than buffer them.
    pub const fn bulky_fields(self) -> &'static [u32] {
        match self {
            // fields_data and hash_keys: the rows. Everything the view reads (names,
            // num_rows) is small, before or after them.
            Request::Insert => &[5, 6],
            _ => &[],
        }
    }
}

/// Where a reply keeps its Milvus status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    /// The reply *is* a `common.Status`.
    BareStatus,
    /// A message with `common.Status status = 1` and nothing else we read.
    StatusField,
    SearchResults,
    QueryResults,
    Mutation,
    DescribeIndex,
}

impl Reply {
    /// The message in `proto/views.proto` this reply is read as.
    pub const fn view(self) -> &'static str {
        match self {
            Reply::BareStatus => "Status",
            Reply::StatusField => "StatusReply",
            Reply::SearchResults => "SearchResults",
            Reply::QueryResults => "QueryResults",
            Reply::Mutation => "MutationResult",
            Reply::DescribeIndex => "DescribeIndexResponse",
        }
    }
}

impl Rpc {
    /// The inspected RPC a request path names, if any.
    pub fn from_path(path: &str) -> Option<Rpc> {
        path.strip_prefix(SERVICE_PREFIX).and_then(Rpc::from_name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_map_to_rpcs_only_under_the_milvus_service() {
        assert_eq!(Rpc::from_path("/milvus.proto.milvus.MilvusService/Search"), Some(Rpc::Search));
        assert_eq!(Rpc::from_path("/other.Service/Search"), None);
        assert_eq!(Rpc::from_path("/milvus.proto.milvus.MilvusService/GetVersion"), None);
        assert_eq!(Rpc::from_path("/milvus.proto.milvus.MilvusService/search"), None);
        for rpc in Rpc::ALL {
            let path = format!("{SERVICE_PREFIX}{}", rpc.name());
            assert_eq!(Rpc::from_path(&path), Some(*rpc));
        }
    }

    #[test]
    fn lifecycle_calls_reply_with_a_bare_status() {
        // Milvus declares these as `returns (common.Status)`; reading them as a wrapped
        // status would mistake error_code (field 1, varint) for a message.
        for rpc in [Rpc::CreateCollection, Rpc::DropCollection, Rpc::LoadCollection, Rpc::CreateIndex] {
            assert_eq!(rpc.reply(), Reply::BareStatus, "{rpc:?}");
        }
        assert_eq!(Rpc::Search.reply(), Reply::SearchResults);
        assert_eq!(Rpc::Upsert.request(), Request::Insert);
    }
}
