//! The API server double against real kube-rs clients: `watcher` (with a reflector, across
//! connection drops, an outage and a compaction), `metadata_watcher`, a `DynamicObject` watch of
//! an Istio type, `events::Recorder`, and list/watch protocol details. Needs no root: the double
//! listens on 127.0.0.1 of the test's own network namespace.

use std::collections::BTreeSet;
use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ObjectReference, Pod, Secret, Service};
use k8s_openapi::api::events::v1::Event as K8sEvent;
use kube::api::{
    Api, ApiResource, DynamicObject, ListParams, Patch, PatchParams, WatchEvent, WatchParams,
};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::core::PartialObjectMeta;
use kube::runtime::events::{Event as Published, EventType, Recorder, Reporter};
use kube::runtime::watcher::{self, Event};
use kube::runtime::{WatchStreamExt, reflector};
use kube::{Client, Config, ResourceExt};
use serde_json::{Value, json};
use tests::apiserver::ApiServer;

/// Deadline for anything the tests wait for.
const T: Duration = Duration::from_secs(15);

async fn client(server: &ApiServer) -> Client {
    let kubeconfig = Kubeconfig::from_yaml(&server.kubeconfig()).expect("parse the kubeconfig");
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("config from the kubeconfig");
    Client::try_from(config).expect("client")
}

fn service(name: &str, cluster_ip: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"clusterIP": cluster_ip, "ports": [{"name": "p", "port": 80, "protocol": "TCP"}]},
    })
}

fn delete_service(server: &ApiServer, name: &str) {
    assert!(
        server.delete("v1", "Service", "default", name),
        "service {name} to delete does not exist"
    );
}

/// The next item of a stream (`next()` without a `futures` dependency: `Stream` is a
/// supertrait of `WatchStreamExt`).
fn next<S: WatchStreamExt + Unpin>(s: &mut S) -> impl Future<Output = Option<S::Item>> + '_ {
    std::future::poll_fn(move |cx| Pin::new(&mut *s).poll_next(cx))
}

/// A watcher event in short: "Init", "InitApply NAME", "InitDone", "Apply NAME", "Delete NAME",
/// or "Err ..." for a watcher error.
fn summary<K: ResourceExt>(item: &watcher::Result<Event<K>>) -> String {
    match item {
        Ok(Event::Init) => "Init".into(),
        Ok(Event::InitApply(o)) => format!("InitApply {}", o.name_any()),
        Ok(Event::InitDone) => "InitDone".into(),
        Ok(Event::Apply(o)) => format!("Apply {}", o.name_any()),
        Ok(Event::Delete(o)) => format!("Delete {}", o.name_any()),
        Err(e) => format!("Err {e}"),
    }
}

/// Pulls events (errors included, as "Err ...") until `done` holds for what was seen, and returns
/// them; panics after the deadline or if the stream ends.
async fn until<S, K>(
    s: &mut S,
    what: &str,
    mut done: impl FnMut(&[String]) -> bool,
) -> (Vec<String>, Vec<watcher::Result<Event<K>>>)
where
    S: WatchStreamExt<Item = watcher::Result<Event<K>>> + Unpin,
    K: ResourceExt,
{
    let deadline = Instant::now() + T;
    let (mut seen, mut items) = (Vec::new(), Vec::new());
    while !done(&seen) {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, next(s)).await {
            Ok(Some(item)) => {
                seen.push(summary(&item));
                items.push(item);
            }
            Ok(None) => panic!("the watcher ended while waiting for {what}; saw {seen:?}"),
            Err(_) => panic!("timed out after {T:?} waiting for {what}; saw {seen:?}"),
        }
    }
    (seen, items)
}

/// The events seen, without watcher errors.
fn ok_events(seen: &[String]) -> Vec<&str> {
    seen.iter()
        .filter(|s| !s.starts_with("Err "))
        .map(String::as_str)
        .collect()
}

fn contains_all(seen: &[String], wanted: &[&str]) -> bool {
    wanted.iter().all(|w| seen.iter().any(|s| s == w))
}

/// Polls `f` (a cheap check of the double's state) until it holds.
async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + T;
    while !f() {
        assert!(Instant::now() < deadline, "timed out after {T:?}: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn watcher_lists_follows_changes_and_recovers_from_drops_outages_and_compaction() {
    let server = ApiServer::start(None);
    server.apply_yaml(&format!(
        "{}---\n{}",
        yaml_doc(&service("a", "198.19.0.1")),
        yaml_doc(&service("b", "198.19.0.2"))
    ));
    let client = client(&server).await;
    let (reader, writer) = reflector::store::<Service>();
    let mut w = Box::pin(
        watcher::watcher(Api::<Service>::all(client), watcher::Config::default())
            .default_backoff()
            .reflect(writer),
    );
    let names = || -> BTreeSet<String> { reader.state().iter().map(|s| s.name_any()).collect() };

    // 1. Initial list, then live changes.
    let (seen, items) = until(&mut w, "the initial list", |s| {
        s.last().is_some_and(|l| l == "InitDone")
    })
    .await;
    assert_eq!(seen, ["Init", "InitApply a", "InitApply b", "InitDone"]);
    let Some(Ok(Event::InitApply(a))) = items.get(1) else {
        unreachable!()
    };
    let meta = &a.metadata;
    assert!(meta.uid.is_some() && meta.creation_timestamp.is_some());
    assert_eq!(meta.namespace.as_deref(), Some("default"));
    assert_eq!(
        a.spec.as_ref().and_then(|s| s.cluster_ip.as_deref()),
        Some("198.19.0.1")
    );

    let rv = server.apply(service("c", "198.19.0.3"));
    let (seen, items) = until(&mut w, "Apply c", |s| s.contains(&"Apply c".into())).await;
    assert_eq!(ok_events(&seen), ["Apply c"]);
    let Some(Ok(Event::Apply(c))) = items.last() else {
        unreachable!()
    };
    assert_eq!(c.metadata.resource_version, Some(rv.to_string()));
    assert_eq!(server.open_watches(), 1);
    delete_service(&server, "a");
    let (seen, _) = until(&mut w, "Delete a", |s| s.contains(&"Delete a".into())).await;
    assert_eq!(ok_events(&seen), ["Delete a"]);
    assert_eq!(names(), BTreeSet::from(["b".into(), "c".into()]));

    // 2a. Connections dropped: the watch resumes from its resourceVersion (no re-list).
    let lists_before = count_lists(&server);
    server.drop_connections();
    assert_eq!(server.open_watches(), 0);
    server.apply(service("d", "198.19.0.4"));
    let (seen, _) = until(&mut w, "Apply d", |s| s.contains(&"Apply d".into())).await;
    assert!(
        !seen.contains(&"Init".into()),
        "re-listed after a dropped connection: {seen:?}"
    );
    assert_eq!(count_lists(&server), lists_before);

    // 2b. Outage: changes made while the server is down arrive after it is back.
    server.stop();
    assert_eq!(server.open_watches(), 0);
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", server.port())).is_err(),
        "the stopped server still accepts connections"
    );
    server.apply(service("e", "198.19.0.5"));
    server.apply(service("c", "198.19.0.33"));
    delete_service(&server, "b");
    server.start_again();
    let wanted = ["Apply e", "Apply c", "Delete b"];
    let (seen, items) = until(&mut w, "the changes made while down", |s| {
        contains_all(s, &wanted)
    })
    .await;
    assert_eq!(ok_events(&seen), wanted, "after the outage");
    assert!(items.iter().any(|i| matches!(i,
        Ok(Event::Apply(s)) if s.spec.as_ref().and_then(|s| s.cluster_ip.as_deref()) == Some("198.19.0.33"))));
    assert_eq!(count_lists(&server), lists_before);
    assert_eq!(
        names(),
        BTreeSet::from(["c".into(), "d".into(), "e".into()])
    );
    eventually("the watch to be open again", || server.open_watches() == 1).await;

    // 3. History compacted while down: the resumed watch gets 410 Gone and the watcher
    // re-lists; the object deleted meanwhile is gone from the store.
    server.stop();
    delete_service(&server, "c");
    server.apply(service("f", "198.19.0.6"));
    server.compact();
    server.start_again();
    let (seen, _) = until(&mut w, "a re-list", |s| {
        s.iter()
            .skip_while(|e| *e != "Init")
            .any(|e| e == "InitDone")
    })
    .await;
    assert!(
        seen.iter().any(|s| s.contains("too old resource version")),
        "no 410 before the re-list: {seen:?}"
    );
    let relist: Vec<&str> = ok_events(&seen);
    assert_eq!(
        relist,
        [
            "Init",
            "InitApply d",
            "InitApply e",
            "InitApply f",
            "InitDone"
        ]
    );
    assert_eq!(count_lists(&server), lists_before + 1);
    assert_eq!(
        names(),
        BTreeSet::from(["d".into(), "e".into(), "f".into()])
    );

    // Compaction plus dropped connections while up to date: nothing was missed, so the watch
    // resumes without a re-list, and later changes still arrive.
    server.compact();
    server.drop_connections();
    server.apply(service("g", "198.19.0.7"));
    let (seen, _) = until(&mut w, "Apply g", |s| s.contains(&"Apply g".into())).await;
    assert!(!seen.contains(&"Init".into()), "{seen:?}");
    assert_eq!(
        names(),
        BTreeSet::from(["d".into(), "e".into(), "f".into(), "g".into()])
    );
}

/// A JSON object as a YAML document (JSON is YAML).
fn yaml_doc(v: &Value) -> String {
    format!("{v}\n")
}

fn count_lists(server: &ApiServer) -> usize {
    server
        .requests()
        .iter()
        .filter(|r| r.starts_with("GET /api/v1/services?") && !r.contains("watch=true"))
        .count()
}

fn pod_server() -> ApiServer {
    let server = ApiServer::start(None);
    server.apply_yaml(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: web-1\n  namespace: shop\n  labels:\n    app: web\n\
         spec:\n  containers:\n  - name: c\n    image: nginx\n",
    );
    server
}

/// A metadata-only watch of pods: an initial list, then a live change, as PartialObjectMetadata
/// with labels.
async fn check_metadata_watch<S>(server: &ApiServer, mut w: S)
where
    S: WatchStreamExt<Item = watcher::Result<Event<PartialObjectMeta<Pod>>>> + Unpin,
{
    let (seen, items) = until(&mut w, "the initial list", |s| {
        s.last().is_some_and(|l| l == "InitDone")
    })
    .await;
    assert_eq!(seen, ["Init", "InitApply web-1", "InitDone"]);
    let Some(Ok(Event::InitApply(p))) = items.get(1) else {
        unreachable!()
    };
    assert_eq!(p.labels().get("app").map(String::as_str), Some("web"));
    assert_eq!(p.namespace().as_deref(), Some("shop"));
    let types = p.types.as_ref().expect("type fields");
    assert_eq!(
        (types.api_version.as_str(), types.kind.as_str()),
        ("meta.k8s.io/v1", "PartialObjectMetadata")
    );

    server.apply(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "web-2", "namespace": "shop", "labels": {"app": "web", "tier": "2"}},
        "spec": {"containers": [{"name": "c", "image": "nginx"}]},
    }));
    let (_, items) = until(&mut w, "Apply web-2", |s| s.contains(&"Apply web-2".into())).await;
    let Some(Ok(Event::Apply(p))) = items.last() else {
        unreachable!()
    };
    assert_eq!(p.labels().get("tier").map(String::as_str), Some("2"));
    assert!(
        p.types
            .as_ref()
            .is_some_and(|t| t.kind == "PartialObjectMetadata")
    );
    let reduced = server
        .requests()
        .iter()
        .any(|r| r.starts_with("GET /api/v1/pods?") && r.contains("watch=true"));
    assert!(reduced, "{:?}", server.requests());
}

/// `metadata_watcher` (deprecated in kube 3.1 but still there).
#[tokio::test]
async fn metadata_watcher_gets_partial_object_metadata_with_labels() {
    let server = pod_server();
    let client = client(&server).await;
    #[allow(deprecated)]
    let w = kube::runtime::metadata_watcher(Api::<Pod>::all(client), watcher::Config::default());
    check_metadata_watch(&server, Box::pin(w)).await;
}

/// What kube 5 recommends instead: `watcher` over `Api<PartialObjectMeta<K>>`.
#[tokio::test]
async fn watcher_of_partial_object_meta_gets_metadata_with_labels() {
    let server = pod_server();
    let client = client(&server).await;
    let w = watcher::watcher(
        Api::<PartialObjectMeta<Pod>>::all(client),
        watcher::Config::default(),
    );
    check_metadata_watch(&server, Box::pin(w)).await;
}

#[tokio::test]
async fn dynamic_watch_of_istio_virtual_services_in_any_version() {
    let server = ApiServer::start(None);
    server.apply_yaml(
        "apiVersion: networking.istio.io/v1beta1\nkind: VirtualService\nmetadata:\n  name: reviews\n  namespace: mesh\n\
         spec:\n  hosts: [reviews]\n  http:\n  - route:\n    - destination: {host: reviews, subset: v1}\n",
    );
    let client = client(&server).await;
    let ar = ApiResource {
        group: "networking.istio.io".into(),
        version: "v1".into(),
        api_version: "networking.istio.io/v1".into(),
        kind: "VirtualService".into(),
        plural: "virtualservices".into(),
    };
    let api: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
    let mut w = Box::pin(watcher::watcher(api, watcher::Config::default()));
    let (seen, items) = until(&mut w, "the initial list", |s| {
        s.last().is_some_and(|l| l == "InitDone")
    })
    .await;
    assert_eq!(seen, ["Init", "InitApply reviews", "InitDone"]);
    let Some(Ok(Event::InitApply(vs))) = items.get(1) else {
        unreachable!()
    };
    assert_eq!(
        vs.types.as_ref().map(|t| t.api_version.as_str()),
        Some("networking.istio.io/v1")
    );
    assert_eq!(vs.data["spec"]["hosts"], json!(["reviews"]));

    // Applied as v1alpha3, the same object changes and is still served as v1.
    server.apply(json!({
        "apiVersion": "networking.istio.io/v1alpha3", "kind": "VirtualService",
        "metadata": {"name": "reviews", "namespace": "mesh"},
        "spec": {"hosts": ["reviews", "reviews.mesh"]},
    }));
    let (_, items) = until(&mut w, "Apply reviews", |s| {
        s.contains(&"Apply reviews".into())
    })
    .await;
    let Some(Ok(Event::Apply(vs))) = items.last() else {
        unreachable!()
    };
    assert_eq!(
        vs.types.as_ref().map(|t| t.api_version.as_str()),
        Some("networking.istio.io/v1")
    );
    assert_eq!(vs.data["spec"]["hosts"], json!(["reviews", "reviews.mesh"]));

    // And as v1alpha3 to a client asking for that version, by name in its namespace.
    let alpha = ApiResource {
        version: "v1alpha3".into(),
        api_version: "networking.istio.io/v1alpha3".into(),
        ..ar
    };
    let got = Api::<DynamicObject>::namespaced_with(client, "mesh", &alpha)
        .get("reviews")
        .await
        .expect("get reviews as v1alpha3");
    assert_eq!(
        got.types.map(|t| t.api_version),
        Some("networking.istio.io/v1alpha3".into())
    );
}

#[tokio::test]
async fn recorder_creates_then_patches_events() {
    let server = ApiServer::start(None);
    let client = client(&server).await;
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "proxy-agent".into(),
            instance: Some("node-1".into()),
        },
    );
    let regarding = ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Service".into()),
        name: Some("web".into()),
        namespace: Some("default".into()),
        ..ObjectReference::default()
    };
    let published = Published {
        type_: EventType::Warning,
        reason: "NoEndpoints".into(),
        note: Some("service web has no ready endpoints".into()),
        action: "Program".into(),
        secondary: None,
    };
    recorder
        .publish(&published, &regarding)
        .await
        .expect("publish (POST)");
    let events = server.events();
    assert_eq!(events.len(), 1, "{events:?}");
    let e = &events[0];
    assert_eq!(e["reason"], "NoEndpoints");
    assert_eq!(e["type"], "Warning");
    assert_eq!(e["regarding"]["name"], "web");
    assert_eq!(e["reportingController"], "proxy-agent");
    assert!(e["metadata"]["resourceVersion"].is_string());

    // The same event again: the recorder patches it into a series.
    recorder
        .publish(&published, &regarding)
        .await
        .expect("publish (PATCH)");
    let events = server.events();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["series"]["count"], 2, "{events:?}");
    let writes: Vec<String> = server
        .requests()
        .into_iter()
        .filter(|r| r.contains("/apis/events.k8s.io/v1/namespaces/default/events"))
        .map(|r| r.split(' ').next().unwrap_or_default().to_string())
        .collect();
    assert_eq!(writes, ["POST", "PATCH"]);

    // Patching an unknown event is a 404 Status; the list serves what exists.
    let api = Api::<K8sEvent>::namespaced(client, "default");
    let err = api
        .patch(
            "nope",
            &PatchParams::default(),
            &Patch::Merge(json!({"note": "x"})),
        )
        .await
        .expect_err("patching a missing event");
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 404 && s.reason == "NotFound"),
        "{err:?}"
    );
    let listed = api.list(&ListParams::default()).await.expect("list events");
    assert_eq!(listed.items.len(), 1);
    assert_eq!(listed.items[0].reason.as_deref(), Some("NoEndpoints"));
}

#[tokio::test]
async fn list_and_watch_protocol_details() {
    let server = ApiServer::start(None);
    for (ns, name) in [
        ("y", "s2"),
        ("x", "s3"),
        ("x", "s1"),
        ("y", "s1"),
        ("x", "s2"),
    ] {
        let mut s = service(name, "198.19.0.9");
        s["metadata"]["namespace"] = ns.into();
        server.apply(s);
    }
    let client = client(&server).await;
    let all = Api::<Service>::all(client.clone());

    // Pages of two, sorted by namespace/name, one resourceVersion for all pages.
    let (mut names, mut rvs, mut token) = (Vec::new(), BTreeSet::new(), None::<String>);
    loop {
        let mut lp = ListParams::default().limit(2);
        if let Some(t) = token.take() {
            lp = lp.continue_token(&t);
        }
        let page = all.list(&lp).await.expect("list a page");
        assert!(page.items.len() <= 2);
        names.extend(
            page.items
                .iter()
                .map(|s| format!("{}/{}", s.namespace().unwrap_or_default(), s.name_any())),
        );
        rvs.insert(page.metadata.resource_version.clone());
        match page.metadata.continue_ {
            Some(t) if !t.is_empty() => token = Some(t),
            _ => break,
        }
        // A change between pages (sorting before the next page) neither changes the list's
        // resourceVersion nor shifts the pages.
        server.apply(service("between-pages", "198.19.0.10"));
    }
    assert_eq!(names, ["x/s1", "x/s2", "x/s3", "y/s1", "y/s2"]);
    assert_eq!(rvs, BTreeSet::from([Some("5".to_string())]));

    // Namespaced list and get.
    let y = Api::<Service>::namespaced(client.clone(), "y");
    let listed = y.list(&ListParams::default()).await.expect("list y");
    assert_eq!(
        listed
            .items
            .iter()
            .map(|s| s.name_any())
            .collect::<Vec<_>>(),
        ["s1", "s2"]
    );
    assert_eq!(y.get("s2").await.expect("get y/s2").name_any(), "s2");
    let err = y.get("s3").await.expect_err("y/s3 does not exist");
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 404),
        "{err:?}"
    );

    // An unserved resource is a 404 Status.
    let err = Api::<Secret>::all(client.clone())
        .list(&ListParams::default())
        .await
        .expect_err("secrets are not served");
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 404 && s.reason == "NotFound"),
        "{err:?}"
    );

    // A watch from an old resourceVersion replays history, then follows live changes, only
    // those of its namespace.
    let mut watch = Box::pin(
        y.watch(&WatchParams::default(), "1")
            .await
            .expect("watch y from 1"),
    );
    assert_eq!(server.open_watches(), 1);
    let mut x_s4 = service("s4", "198.19.0.12");
    x_s4["metadata"]["namespace"] = "x".into();
    server.apply(x_s4);
    let mut y_s3 = service("s3", "198.19.0.13");
    y_s3["metadata"]["namespace"] = "y".into();
    server.apply(y_s3);
    let mut seen = Vec::new();
    while seen.len() < 2 {
        match tokio::time::timeout(T, next(&mut watch)).await {
            Ok(Some(Ok(WatchEvent::Added(s)))) => seen.push(s.name_any()),
            Ok(Some(Ok(WatchEvent::Bookmark(_)))) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    // y/s2 is rv 1 itself; y/s1 (rv 4) is replayed; x/s4 is filtered out; y/s3 is live.
    assert_eq!(seen, ["s1", "s3"]);
    drop(watch);
    eventually("the dropped watch to close", || server.open_watches() == 0).await;

    // A streaming list (sendInitialEvents) instead of list + watch.
    let mut w = Box::pin(watcher::watcher(
        y.clone(),
        watcher::Config::default().streaming_lists(),
    ));
    let (seen, _) = until(&mut w, "the streamed initial list", |s| {
        s.last().is_some_and(|l| l == "InitDone")
    })
    .await;
    assert_eq!(
        seen,
        [
            "Init",
            "InitApply s1",
            "InitApply s2",
            "InitApply s3",
            "InitDone"
        ]
    );
    assert!(
        server
            .requests()
            .iter()
            .any(|r| r.contains("sendInitialEvents=true"))
    );
    drop(w);

    // Bookmarks about every second, and the stream ends after timeoutSeconds.
    let start = Instant::now();
    let mut watch = Box::pin(
        all.watch(&WatchParams::default().timeout(2), "0")
            .await
            .expect("watch with a timeout"),
    );
    let mut bookmarks = 0;
    loop {
        match tokio::time::timeout(T, next(&mut watch)).await {
            Ok(Some(Ok(WatchEvent::Bookmark(b)))) => {
                assert_eq!(
                    b.metadata.resource_version,
                    server.resource_version().to_string()
                );
                bookmarks += 1;
            }
            Ok(None) => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(5),
        "{took:?}"
    );
    assert!(bookmarks >= 1, "no bookmark in 2 s");

    // After a compaction, a watch from an older resourceVersion gets one 410 and ends.
    let old = server.resource_version();
    server.apply(service("later", "198.19.0.11"));
    server.compact();
    let mut watch = Box::pin(
        all.watch(&WatchParams::default(), &old.to_string())
            .await
            .expect("watch from a compacted resourceVersion"),
    );
    match tokio::time::timeout(T, next(&mut watch)).await {
        Ok(Some(Ok(WatchEvent::Error(s)))) => {
            assert_eq!((s.code, s.reason.as_str()), (410, "Expired"));
            assert_eq!(
                s.message,
                format!("too old resource version: {old} ({})", old + 1)
            );
        }
        other => panic!(
            "expected a 410 ERROR event, got {:?}",
            other.map(|o| o.map(|r| r.map(|_| ())))
        ),
    }
    assert!(matches!(
        tokio::time::timeout(T, next(&mut watch)).await,
        Ok(None)
    ));
}

/// The server's socket lives in the given network namespace (and again after a restart).
#[test]
fn listens_inside_the_given_network_namespace() {
    tests::sys::require_root();
    let name = format!("{}{}-apiserver", tests::sys::PREFIX, std::process::id());
    tests::sys::ip(&["netns", "add", &name]);
    struct Cleanup(String);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = tests::leftovers::remove_netns(&self.0);
        }
    }
    let _cleanup = Cleanup(name.clone());
    tests::sys::ip(&["-n", &name, "link", "set", "lo", "up"]);
    let path = std::path::Path::new("/run/netns").join(&name);
    let server = ApiServer::start(Some(&path));
    let reachable_here = || std::net::TcpStream::connect(("127.0.0.1", server.port())).is_ok();
    let reachable_in_netns = || {
        std::process::Command::new("ip")
            .args(["netns", "exec", &name, "bash", "-c"])
            .arg(format!("exec 3<>/dev/tcp/127.0.0.1/{}", server.port()))
            .status()
            .is_ok_and(|s| s.success())
    };
    assert!(reachable_in_netns(), "not listening inside {name}");
    assert!(!reachable_here(), "listening outside {name}");
    server.stop();
    assert!(!reachable_in_netns(), "still listening after stop()");
    server.start_again();
    assert!(
        reachable_in_netns(),
        "not listening inside {name} after a restart"
    );
    assert!(
        !reachable_here(),
        "listening outside {name} after a restart"
    );
}
