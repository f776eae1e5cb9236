//! Leader election against a mocked Lease API (in memory, with resourceVersion checks as the API
//! server makes them): one replica leads, the other follows; when the leader stops renewing, the
//! other takes over after the Lease's duration; of two replicas racing for it, exactly one wins.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use mantle_operator::leader::Elector;
use serde_json::{Value, json};

#[derive(Default)]
struct Stored {
    lease: Option<Value>,
    version: u64,
}

fn status(code: u16, reason: &str) -> Response<Body> {
    let body = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason, "code": code, "message": reason});
    let mut response = Response::new(Body::from(body.to_string()));
    *response.status_mut() = StatusCode::from_u16(code).unwrap();
    response
}

fn lease_api(
    stored: Arc<Mutex<Stored>>,
) -> impl tower::Service<Request<kube::client::Body>, Response = Response<Body>, Error = Infallible, Future = impl Send>
+ Send
+ Clone {
    tower::service_fn(move |request: Request<kube::client::Body>| {
        let stored = stored.clone();
        async move {
            // Let a concurrent replica's request in between, as a real server would.
            tokio::task::yield_now().await;
            let method = request.method().clone();
            let bytes = request.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            let mut body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            let mut s = stored.lock().unwrap();
            let answer = match method.as_str() {
                "GET" => match &s.lease {
                    Some(lease) => lease.clone(),
                    None => return Ok(status(404, "NotFound")),
                },
                "POST" if s.lease.is_some() => return Ok(status(409, "AlreadyExists")),
                "POST" | "PUT" => {
                    let current = s.lease.as_ref().map(|l| l["metadata"]["resourceVersion"].clone());
                    if method == "PUT" && current != Some(body["metadata"]["resourceVersion"].clone()) {
                        return Ok(status(409, "Conflict"));
                    }
                    s.version += 1;
                    body["metadata"]["resourceVersion"] = json!(s.version.to_string());
                    s.lease = Some(body.clone());
                    body
                }
                _ => return Ok(status(405, "MethodNotAllowed")),
            };
            Ok(Response::new(Body::from(answer.to_string())))
        }
    })
}

fn elector(stored: &Arc<Mutex<Stored>>, who: &str) -> Elector {
    let client = kube::Client::new(lease_api(stored.clone()), "mantle-system");
    Elector::new(Api::<Lease>::namespaced(client, "mantle-system"), "mantle-operator", who, Duration::from_secs(1))
}

fn holder(stored: &Arc<Mutex<Stored>>) -> String {
    stored.lock().unwrap().lease.as_ref().unwrap()["spec"]["holderIdentity"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn one_replica_leads_and_another_takes_over_when_it_stops_renewing() {
    let stored = Arc::new(Mutex::new(Stored::default()));
    let (a, b) = (elector(&stored, "operator-a"), elector(&stored, "operator-b"));
    assert!(a.step().await.unwrap(), "the first replica creates the Lease and leads");
    assert!(!b.step().await.unwrap(), "the second follows");
    for _ in 0..3 {
        tokio::time::sleep(a.renew_every()).await;
        assert!(a.step().await.unwrap(), "the leader renews");
        assert!(!b.step().await.unwrap(), "and keeps the lead");
    }
    assert_eq!(holder(&stored), "operator-a");
    // The leader stops (its pod died): after the Lease's duration, the other takes over.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(b.step().await.unwrap(), "the follower takes over an expired Lease");
    assert_eq!(holder(&stored), "operator-b");
    assert_eq!(stored.lock().unwrap().lease.as_ref().unwrap()["spec"]["leaseTransitions"], 1);
    assert!(!a.step().await.unwrap(), "the old leader, back, follows");
}

#[tokio::test]
async fn of_two_replicas_racing_for_an_expired_lease_exactly_one_wins() {
    let stored = Arc::new(Mutex::new(Stored::default()));
    assert!(elector(&stored, "gone").step().await.unwrap());
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (c, d) = (elector(&stored, "operator-c"), elector(&stored, "operator-d"));
    let (won_c, won_d) = tokio::join!(c.step(), d.step());
    let (won_c, won_d) = (won_c.unwrap(), won_d.unwrap());
    assert!(won_c ^ won_d, "exactly one leads: c {won_c}, d {won_d}");
    assert_eq!(holder(&stored), if won_c { "operator-c" } else { "operator-d" });
}
