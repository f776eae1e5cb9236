//! Demand: the requests waiting in the routers' queues for each model's shared pools — what the
//! autoscaler reads in a cluster (in `mantle dev` it asks the router in-process). Each router pod
//! serves `mantle_router_queue_depth{model, pool, lane}` on its admin port; the operator finds the
//! pods through the router Service's EndpointSlices and adds their queues up.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::ListParams;
use kube::{Api, Client};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Requests waiting for each model's shared pools (model id → requests), summed over lanes, from
/// one router's metrics text.
pub fn parse_queue_depth(metrics: &str) -> BTreeMap<String, f64> {
    let mut demand = BTreeMap::new();
    for line in metrics.lines() {
        let Some(rest) = line.strip_prefix("mantle_router_queue_depth{") else { continue };
        let Some((labels, value)) = rest.split_once("} ") else { continue };
        let label = |name: &str| {
            labels.split(',').find_map(|l| l.strip_prefix(&format!("{name}=\""))).map(|v| v.trim_end_matches('"'))
        };
        let (Some(model), Some("shared")) = (label("model"), label("pool")) else { continue };
        let Ok(value) = value.trim().parse::<f64>() else { continue };
        *demand.entry(model.to_string()).or_insert(0.0) += value;
    }
    demand
}

/// `GET /metrics` from one router pod (plain HTTP/1.0, two seconds at most).
async fn metrics_of(addr: SocketAddr) -> Option<String> {
    let fetch = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        stream.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes()).await.ok()?;
        let mut text = String::new();
        stream.take(64 << 20).read_to_string(&mut text).await.ok()?;
        text.split_once("\r\n\r\n").map(|(_, body)| body.to_string())
    };
    tokio::time::timeout(Duration::from_secs(2), fetch).await.ok().flatten()
}

/// The demand every ready pod of the router Service `namespace/name` reports (its port named
/// `metrics`); none when no pod answered.
pub async fn router_demand(client: &Client, namespace: &str, name: &str) -> Option<BTreeMap<String, f64>> {
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), namespace);
    let params = ListParams::default().labels(&format!("kubernetes.io/service-name={name}"));
    let slices = slices.list(&params).await.ok()?;
    let mut total: Option<BTreeMap<String, f64>> = None;
    for slice in slices.items {
        let port = slice.ports.iter().flatten().find(|p| p.name.as_deref() == Some("metrics")).and_then(|p| p.port);
        let Some(port) = port else { continue };
        for endpoint in &slice.endpoints {
            if endpoint.conditions.as_ref().and_then(|c| c.ready) == Some(false) {
                continue;
            }
            for address in &endpoint.addresses {
                let Ok(ip) = address.parse::<std::net::IpAddr>() else { continue };
                let Some(text) = metrics_of(SocketAddr::new(ip, port as u16)).await else { continue };
                let sum = total.get_or_insert_with(BTreeMap::new);
                for (model, queued) in parse_queue_depth(&text) {
                    *sum.entry(model).or_insert(0.0) += queued;
                }
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shared_queues_of_each_model_are_added_up_over_lanes() {
        let text = "# HELP mantle_router_queue_depth Requests waiting\n\
            mantle_router_queue_depth{model=\"a.b-v1:0\",pool=\"shared\",lane=\"short\"} 3\n\
            mantle_router_queue_depth{model=\"a.b-v1:0\",pool=\"shared\",lane=\"long\"} 2\n\
            mantle_router_queue_depth{model=\"a.b-v1:0\",pool=\"analytics\",lane=\"short\"} 7\n\
            mantle_router_queue_depth{model=\"c.d-v1:0\",pool=\"shared\",lane=\"short\"} 0\n\
            mantle_router_queue_depth{model=\"broken\" 4\n\
            mantle_router_requests_total{api=\"Converse\",model=\"a.b-v1:0\",outcome=\"ok\"} 9\n";
        let demand = parse_queue_depth(text);
        assert_eq!(demand.get("a.b-v1:0"), Some(&5.0), "{demand:?}");
        assert_eq!(demand.get("c.d-v1:0"), Some(&0.0));
        assert_eq!(demand.len(), 2, "a dedicated pool's queue and broken lines are not shared demand");
    }
}
