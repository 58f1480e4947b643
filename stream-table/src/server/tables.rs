//! `quire.table.v1.TableService` over [`crate::table`]: each key-level call is routed to the
//! key's range, opened here on demand (or redirected to its owner).

use std::time::Duration;

use bytes::Bytes;
use quire_proto::table as pb;
use tonic::{Request, Response, Status};

use super::{StreamTableServer, to_status, user_name};
use crate::error::{Error, Result};
use crate::names::Name;
use crate::table::model::common_range;
use crate::table::{
    Compare, CompareOp, CompareTarget, Expect, KeyValue, OpResult, Range, TableConfig, TableMeta,
    Txn, TxnOp, Value, range_of,
};

pub(crate) struct TableApi(pub(crate) StreamTableServer);

type Resp<T> = std::result::Result<Response<T>, Status>;

fn st(e: Error) -> Status {
    to_status(&e)
}

fn name_of(n: Option<&pb::TableName>) -> Result<Name> {
    let n = n.ok_or_else(|| Error::InvalidArgument("a table name is required".into()))?;
    user_name(&n.namespace, &n.name)
}

pub(crate) fn pb_name(n: &Name) -> pb::TableName {
    pb::TableName {
        namespace: n.namespace.clone(),
        name: n.name.clone(),
    }
}

pub(crate) fn config_from(c: Option<&pb::TableConfig>) -> TableConfig {
    let mut cfg = TableConfig::default();
    let Some(c) = c else { return cfg };
    if c.ranges != 0 {
        cfg.ranges = c.ranges;
    }
    if c.checkpoint_interval_ms != 0 {
        cfg.checkpoint_interval = Duration::from_millis(c.checkpoint_interval_ms);
    }
    if c.checkpoint_every != 0 {
        cfg.checkpoint_every = c.checkpoint_every;
    }
    if c.max_bytes != 0 {
        cfg.max_bytes = c.max_bytes;
    }
    if c.changelog_segment_max_entries != 0 {
        cfg.changelog.segment_max_entries = c.changelog_segment_max_entries;
    }
    if c.changelog_segment_max_bytes != 0 {
        cfg.changelog.segment_max_bytes = c.changelog_segment_max_bytes;
    }
    cfg
}

pub(crate) fn config_to(c: &TableConfig) -> pb::TableConfig {
    pb::TableConfig {
        ranges: c.ranges,
        checkpoint_interval_ms: c.checkpoint_interval.as_millis().min(u64::MAX as u128) as u64,
        checkpoint_every: c.checkpoint_every,
        max_bytes: c.max_bytes,
        changelog_segment_max_entries: c.changelog.segment_max_entries,
        changelog_segment_max_bytes: c.changelog.segment_max_bytes,
    }
}

fn info_to(m: &TableMeta) -> pb::TableInfo {
    pb::TableInfo {
        name: Some(pb_name(&m.name)),
        config: Some(config_to(&m.config)),
        created_ms: m.created_ms,
    }
}

pub(crate) fn value_to(v: &Value) -> pb::Value {
    pb::Value {
        kind: Some(match v {
            Value::Bytes(b) => pb::value::Kind::Bytes(b.clone()),
            Value::Number(n) => pb::value::Kind::Number(*n),
        }),
    }
}

pub(crate) fn value_from(v: Option<pb::Value>) -> Result<Value> {
    match v.and_then(|v| v.kind) {
        Some(pb::value::Kind::Bytes(b)) => Ok(Value::Bytes(b)),
        Some(pb::value::Kind::Number(n)) => Ok(Value::Number(n)),
        None => Err(Error::InvalidArgument("a value is required".into())),
    }
}

pub(crate) fn kv_to(kv: &KeyValue) -> pb::KeyValue {
    pb::KeyValue {
        key: kv.key.clone(),
        value: Some(value_to(&kv.value)),
        version: kv.version,
        create_revision: kv.create_revision,
        mod_revision: kv.mod_revision,
    }
}

pub(crate) fn expect_from(e: Option<pb::Expect>) -> Option<Expect> {
    match e?.kind? {
        pb::expect::Kind::Version(v) => Some(Expect::Version(v)),
        pb::expect::Kind::ModRevision(r) => Some(Expect::ModRevision(r)),
    }
}

pub(crate) fn txn_from(req: pb::TxnRequest) -> Result<Txn> {
    let op = |o: pb::TxnOp| -> Result<TxnOp> {
        Ok(match o.op {
            Some(pb::txn_op::Op::Put(p)) => TxnOp::Put {
                key: p.key,
                value: value_from(p.value)?,
            },
            Some(pb::txn_op::Op::Delete(k)) => TxnOp::Delete { key: k },
            Some(pb::txn_op::Op::Get(k)) => TxnOp::Get { key: k },
            Some(pb::txn_op::Op::Increment(i)) => TxnOp::Increment {
                key: i.key,
                amount: i.amount,
            },
            None => {
                return Err(Error::InvalidArgument(
                    "a txn op without an operation".into(),
                ));
            }
        })
    };
    let mut compares = Vec::with_capacity(req.compares.len());
    for c in req.compares {
        let op = match pb::compare::Op::try_from(c.op) {
            Ok(pb::compare::Op::Equal) => CompareOp::Equal,
            Ok(pb::compare::Op::NotEqual) => CompareOp::NotEqual,
            Ok(pb::compare::Op::Greater) => CompareOp::Greater,
            Ok(pb::compare::Op::Less) => CompareOp::Less,
            Err(_) => {
                return Err(Error::InvalidArgument(format!(
                    "unknown compare op {}",
                    c.op
                )));
            }
        };
        let target = match c.target {
            Some(pb::compare::Target::Value(v)) => CompareTarget::Value(value_from(Some(v))?),
            Some(pb::compare::Target::Version(v)) => CompareTarget::Version(v),
            Some(pb::compare::Target::ModRevision(r)) => CompareTarget::ModRevision(r),
            Some(pb::compare::Target::Exists(e)) => CompareTarget::Exists(e),
            None => return Err(Error::InvalidArgument("a compare without a target".into())),
        };
        compares.push(Compare {
            key: c.key,
            target,
            op,
        });
    }
    Ok(Txn {
        compares,
        success: req.success.into_iter().map(op).collect::<Result<_>>()?,
        failure: req.failure.into_iter().map(op).collect::<Result<_>>()?,
    })
}

fn op_result_to(r: OpResult) -> pb::OpResult {
    use pb::op_result::Result as R;
    pb::OpResult {
        result: Some(match r {
            OpResult::Put { revision } => R::PutRevision(revision),
            OpResult::Delete { deleted } => R::Deleted(deleted),
            OpResult::Get(kv) => R::Get(pb::GetResponse {
                kv: kv.as_ref().map(kv_to),
            }),
            OpResult::Increment(t) => R::Total(t),
        }),
    }
}

impl TableApi {
    /// The range that owns `key` in `table`.
    async fn range_for(&self, table: &Name, key: &[u8]) -> Result<Range> {
        let s = &self.0.inner;
        let meta = s.table_meta(table).await?;
        s.range(table, range_of(key, meta.config.ranges)).await
    }

    /// Runs `f` on `table`'s range for `key`, bounded; a range that failed is dropped, and a
    /// table that vanished is forgotten.
    async fn on_range<T, F, Fut>(&self, table: &Name, key: &[u8], what: &str, f: F) -> Result<T>
    where
        F: FnOnce(Range) -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let s = &self.0.inner;
        let r = s.bounded(what, async {
            let range = self.range_for(table, key).await?;
            let out = f(range.clone()).await;
            if out.is_err() {
                s.check_range(&range);
            }
            out
        });
        let out = r.await;
        if let Err(Error::NoSuchTable(_)) = &out {
            s.forget_table(table);
        }
        out
    }
}

#[tonic::async_trait]
impl pb::table_service_server::TableService for TableApi {
    async fn create_table(&self, req: Request<pb::CreateTableRequest>) -> Resp<pb::TableInfo> {
        let s = &self.0.inner;
        let req = req.into_inner();
        let name = name_of(req.table.as_ref()).map_err(st)?;
        let cfg = config_from(req.config.as_ref());
        let meta = s
            .bounded("create table", s.tables.create(&name, cfg))
            .await
            .map_err(st)?;
        s.forget_table(&name);
        Ok(Response::new(info_to(&meta)))
    }

    async fn delete_table(
        &self,
        req: Request<pb::DeleteTableRequest>,
    ) -> Resp<pb::DeleteTableResponse> {
        let s = &self.0.inner;
        let name = name_of(req.get_ref().table.as_ref()).map_err(st)?;
        s.forget_table(&name);
        s.bounded("delete table", s.tables.delete(&name))
            .await
            .map_err(st)?;
        Ok(Response::new(pb::DeleteTableResponse {}))
    }

    async fn get_table(&self, req: Request<pb::GetTableRequest>) -> Resp<pb::TableInfo> {
        let s = &self.0.inner;
        let name = name_of(req.get_ref().table.as_ref()).map_err(st)?;
        let meta = s
            .bounded("table info", s.tables.info(&name))
            .await
            .map_err(st)?;
        Ok(Response::new(info_to(&meta)))
    }

    async fn list_tables(
        &self,
        req: Request<pb::ListTablesRequest>,
    ) -> Resp<pb::ListTablesResponse> {
        let s = &self.0.inner;
        let ns = &req.get_ref().namespace;
        user_name(ns, "x").map_err(st)?;
        let names = s
            .bounded("list tables", s.tables.list(ns))
            .await
            .map_err(st)?;
        Ok(Response::new(pb::ListTablesResponse {
            names: names.iter().map(pb_name).collect(),
        }))
    }

    async fn get(&self, req: Request<pb::GetRequest>) -> Resp<pb::GetResponse> {
        let req = req.into_inner();
        let name = name_of(req.table.as_ref()).map_err(st)?;
        let key = req.key;
        let kv = self
            .on_range(
                &name,
                &key.clone(),
                "get",
                |r| async move { r.get(&key).await },
            )
            .await
            .map_err(st)?;
        Ok(Response::new(pb::GetResponse {
            kv: kv.as_ref().map(kv_to),
        }))
    }

    async fn put(&self, req: Request<pb::PutRequest>) -> Resp<pb::PutResponse> {
        let req = req.into_inner();
        let name = name_of(req.table.as_ref()).map_err(st)?;
        let value = value_from(req.value).map_err(st)?;
        let expect = expect_from(req.expect);
        let key = req.key;
        let prev = req.prev_kv;
        let r = self
            .on_range(&name, &key.clone(), "put", |r| async move {
                r.put(key, value, expect, prev).await
            })
            .await
            .map_err(st)?;
        Ok(Response::new(pb::PutResponse {
            succeeded: r.succeeded,
            revision: r.revision,
            prev_kv: r.prev_kv.as_ref().map(kv_to),
        }))
    }

    async fn delete(&self, req: Request<pb::DeleteRequest>) -> Resp<pb::DeleteResponse> {
        let req = req.into_inner();
        let name = name_of(req.table.as_ref()).map_err(st)?;
        let expect = expect_from(req.expect);
        let key = req.key;
        let prev = req.prev_kv;
        let r = self
            .on_range(&name, &key.clone(), "delete", |r| async move {
                r.delete(key, expect, prev).await
            })
            .await
            .map_err(st)?;
        Ok(Response::new(pb::DeleteResponse {
            succeeded: r.succeeded,
            deleted: r.deleted,
            revision: r.revision,
            prev_kv: r.prev_kv.as_ref().map(kv_to),
        }))
    }

    async fn scan(&self, req: Request<pb::ScanRequest>) -> Resp<pb::ScanResponse> {
        let s = &self.0.inner;
        let req = req.into_inner();
        let name = name_of(req.table.as_ref()).map_err(st)?;
        let out = s
            .bounded("scan", async {
                let meta = s.table_meta(&name).await?;
                if req.range >= meta.config.ranges {
                    return Err(Error::InvalidArgument(format!(
                        "table {name} has {} ranges, no range {}",
                        meta.config.ranges, req.range
                    )));
                }
                let range = s.range(&name, req.range).await?;
                let end: Option<Bytes> = req.end.clone();
                let out = range
                    .scan(&req.start, end.as_ref(), req.limit as usize)
                    .await;
                if out.is_err() {
                    s.check_range(&range);
                }
                out
            })
            .await
            .map_err(st)?;
        Ok(Response::new(pb::ScanResponse {
            kvs: out.0.iter().map(kv_to).collect(),
            more: out.1,
        }))
    }

    async fn increment(&self, req: Request<pb::IncrementRequest>) -> Resp<pb::IncrementResponse> {
        let req = req.into_inner();
        let name = name_of(req.table.as_ref()).map_err(st)?;
        let key = req.key;
        let amount = req.amount;
        let total = self
            .on_range(&name, &key.clone(), "increment", |r| async move {
                r.increment(key, amount).await
            })
            .await
            .map_err(st)?;
        Ok(Response::new(pb::IncrementResponse { total }))
    }

    async fn txn(&self, req: Request<pb::TxnRequest>) -> Resp<pb::TxnResponse> {
        let s = &self.0.inner;
        let req = req.into_inner();
        let name = name_of(req.table.as_ref()).map_err(st)?;
        let txn = txn_from(req).map_err(st)?;
        let meta = s.bounded("txn", s.table_meta(&name)).await.map_err(st)?;
        let Some(r) = common_range(txn.keys(), meta.config.ranges).map_err(st)? else {
            return Err(st(Error::InvalidArgument(
                "a transaction must name at least one key".into(),
            )));
        };
        let key = txn.keys().next().cloned().unwrap_or_default();
        debug_assert_eq!(range_of(&key, meta.config.ranges), r);
        let out = self
            .on_range(
                &name,
                &key,
                "txn",
                |range| async move { range.txn(txn).await },
            )
            .await
            .map_err(st)?;
        Ok(Response::new(pb::TxnResponse {
            succeeded: out.succeeded,
            revision: out.revision,
            results: out.results.into_iter().map(op_result_to).collect(),
        }))
    }
}
