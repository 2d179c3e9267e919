//! The cluster store (etcd) as both sides use it: a client that connects
//! lazily (a node or edge starts while the store is down and catches up when
//! it is back), every one-shot call bounded in time, and one error type.

use std::future::Future;
use std::time::Duration;

use etcd_client::{Client, ConnectOptions};

/// How long a one-shot call (get, put, transaction, grant) may take; longer
/// means the store cannot be reached.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a store call failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the cluster store did not answer in {0:?}")]
    TimedOut(Duration),
    #[error("the cluster store refused the call: {0}")]
    Call(#[source] etcd_client::Error),
}

impl StoreError {
    /// The store says the lease is gone (expired or revoked).
    pub fn lease_not_found(&self) -> bool {
        matches!(self, StoreError::Call(etcd_client::Error::GRpcStatus(s))
            if s.message().contains("requested lease not found"))
    }
}

/// A client for `endpoints` (`http://HOST:PORT`). Nothing is dialled yet:
/// the channel connects on first use and again after a failure. HTTP/2
/// pings notice a dead member within seconds, so a watch on it ends and the
/// next call goes to another member.
pub async fn client(endpoints: &[String]) -> Result<Client, StoreError> {
    let options = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(1))
        .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
        .with_keep_alive_while_idle(true);
    Client::connect(endpoints, Some(options))
        .await
        .map_err(StoreError::Call)
}

/// One call, bounded by `CALL_TIMEOUT`.
pub async fn call<T>(
    fut: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(CALL_TIMEOUT, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(StoreError::Call(e)),
        Err(_) => Err(StoreError::TimedOut(CALL_TIMEOUT)),
    }
}

/// The end of a prefix range: the prefix with its last byte raised.
pub fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_ends_where_the_next_begins() {
        assert_eq!(prefix_end("/slipway/v1/sbx/"), b"/slipway/v1/sbx0");
        assert_eq!(prefix_end("a\u{7f}"), b"a\x80");
    }
}
