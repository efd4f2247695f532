//! Istio's fault-injection and request-timeout tasks on the local mesh, in
//! ambient mode behind the namespace's waypoint, with Bookinfo's YAML
//! applied unchanged: the 7 s ratings delay for jason makes productpage give
//! up on reviews (two 3 s tries), the 2 s and 1 s delays that fit, the HTTP
//! abort, and the 0.5 s reviews timeout against a 2 s ratings delay. Times
//! are printed; the assertions are on what the page shows (plus lower
//! bounds that only an injected delay explains).

mod common;

use std::time::Duration;

use common::{within_binomial, Task};

const WAIT: Duration = Duration::from_secs(90);
const REVIEWS_UNAVAILABLE: &str = "Sorry, product reviews are currently unavailable for this book.";
const RATINGS_UNAVAILABLE: &str = "Ratings service is currently unavailable";
const BLACK_STARS: &str = "text-black-500";

/// A VirtualService routing ratings to v1, with `fault` (YAML indented
/// for the rule) applied to jason only or to everyone.
fn ratings_vs(fault: &str, jason_only: bool) -> String {
    let faulty = format!("    fault:\n{fault}    route:\n    - destination:\n        host: ratings\n        subset: v1\n");
    let rest = if jason_only {
        "  - route:\n    - destination:\n        host: ratings\n        subset: v1\n"
    } else {
        ""
    };
    let head = if jason_only {
        "  - match:\n    - headers:\n        end-user:\n          exact: jason\n"
    } else {
        "  -\n"
    };
    format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: ratings\nspec:\n  hosts:\n  - ratings\n  http:\n{head}{faulty}{rest}"
    )
}

/// reviews to v2, with an optional route timeout.
fn reviews_v2(timeout: Option<&str>) -> String {
    let timeout = timeout
        .map(|t| format!("    timeout: {t}\n"))
        .unwrap_or_default();
    format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: reviews\nspec:\n  hosts:\n  - reviews\n  http:\n  - route:\n    - destination:\n        host: reviews\n        subset: v2\n{timeout}"
    )
}

#[test]
fn bookinfo_fault_injection_and_request_timeouts_through_the_waypoint() {
    if !e2e::is_root() {
        eprintln!("skipping: needs root");
        return;
    }
    let t = Task::start(
        "faults",
        &["samples/bookinfo/bookinfo.yaml", "samples/curl/curl.yaml"],
    );
    t.wait_through_waypoint("reviews");
    let curl = t.pod("app=curl");

    t.apply_file("samples/bookinfo/networking/destination-rule-all.yaml");
    t.apply_file("samples/bookinfo/networking/virtual-service-all-v1.yaml");
    t.apply_file("samples/bookinfo/networking/virtual-service-reviews-test-v2.yaml");
    t.eventually(
        "jason on reviews v2",
        WAIT,
        || t.page(Some("jason")).0,
        |p| p.contains(BLACK_STARS),
    );

    // The 7 s delay: reviews v2 waits for ratings (10 s timeout), but
    // productpage gives up on reviews after 3 s, twice.
    t.apply_file("samples/bookinfo/networking/virtual-service-ratings-test-delay.yaml");
    t.eventually(
        "7 s delay for jason",
        WAIT,
        || t.page(Some("jason")).0,
        |p| p.contains(REVIEWS_UNAVAILABLE),
    );
    let (page, took) = t.page(Some("jason"));
    eprintln!("7 s delay: jason's page in {took:?}");
    assert!(page.contains(REVIEWS_UNAVAILABLE), "{page}");
    assert!(page.contains("Simple Bookstore App"), "{page}");
    assert!(took >= Duration::from_secs(5), "gave up after {took:?}");
    let (page, took) = t.page(None);
    eprintln!("7 s delay: anonymous page in {took:?}");
    assert!(
        !page.contains(REVIEWS_UNAVAILABLE) && page.contains("reviews-v1"),
        "anonymous users are not delayed: {page}"
    );

    // The fixes that work: delays under productpage's 3 s.
    for delay in ["2s", "1s"] {
        t.apply(&ratings_vs(
            &format!("      delay:\n        percentage:\n          value: 100.0\n        fixedDelay: {delay}\n"),
            true,
        ));
        t.eventually(
            &format!("{delay} delay for jason"),
            WAIT,
            || t.page(Some("jason")).0,
            |p| p.contains(BLACK_STARS) && !p.contains(REVIEWS_UNAVAILABLE),
        );
        let (page, took) = t.page(Some("jason"));
        eprintln!("{delay} delay: jason's page in {took:?}");
        assert!(page.contains(BLACK_STARS), "{page}");
        let secs: u64 = delay.trim_end_matches('s').parse().unwrap();
        assert!(took >= Duration::from_secs(secs), "{delay}: {took:?}");
    }

    // HTTP abort for jason: reviews v2 shows ratings as unavailable.
    t.apply_file("samples/bookinfo/networking/virtual-service-ratings-test-abort.yaml");
    t.eventually(
        "abort for jason",
        WAIT,
        || t.page(Some("jason")).0,
        |p| p.contains(RATINGS_UNAVAILABLE),
    );
    let (page, _) = t.page(None);
    assert!(!page.contains(RATINGS_UNAVAILABLE), "anonymous: {page}");
    let out = t.sh(
        &curl,
        "curl -s -w ' %{http_code}' -H 'end-user: jason' http://ratings:9080/ratings/0",
    );
    assert_eq!(out, "fault filter abort 500", "abort seen by a client");

    // 503 for jason with the legacy `percent` form, then half of everyone's
    // requests aborted.
    t.apply(&ratings_vs(
        "      abort:\n        percent: 100\n        httpStatus: 503\n",
        true,
    ));
    t.eventually(
        "abort 503 for jason (percent)",
        WAIT,
        || {
            t.sh(
                &curl,
                "curl -s -o /dev/null -w '%{http_code}' -H 'end-user: jason' http://ratings:9080/ratings/0",
            )
        },
        |c| c == "503",
    );
    t.eventually(
        "jason's ratings page with the 503 abort",
        WAIT,
        || t.page(Some("jason")).0,
        |p| p.contains(RATINGS_UNAVAILABLE),
    );
    let ok = t.sh(
        &curl,
        "curl -s -o /dev/null -w '%{http_code}' http://ratings:9080/ratings/0",
    );
    assert_eq!(ok, "200", "only jason is aborted");
    t.apply(&ratings_vs(
        "      abort:\n        percentage:\n          value: 50\n        httpStatus: 503\n",
        false,
    ));
    let codes = t.eventually(
        "abort 503 for half the requests",
        WAIT,
        || {
            t.sh(
                &curl,
                "i=0; while [ $i -lt 100 ]; do i=$((i+1)); curl -s -o /dev/null -w '%{http_code}\\n' http://ratings:9080/ratings/0; done",
            )
        },
        |out| out.lines().any(|l| l == "200"),
    );
    let aborted = codes.lines().filter(|l| *l == "503").count();
    let ok = codes.lines().filter(|l| *l == "200").count();
    eprintln!("50% abort: {aborted} of 100 aborted");
    assert_eq!(aborted + ok, 100, "{codes}");
    assert!(within_binomial(aborted, 100, 0.5), "{aborted} of 100");

    // Request timeouts: reviews v2, ratings delayed 2 s for everyone.
    t.apply(&reviews_v2(None));
    t.apply(&ratings_vs(
        "      delay:\n        percent: 100\n        fixedDelay: 2s\n",
        false,
    ));
    t.eventually(
        "reviews v2 with ratings delayed 2 s",
        WAIT,
        || t.page(None),
        |(p, took)| p.contains(BLACK_STARS) && *took >= Duration::from_secs(2),
    );
    // A client's own deadline through the waypoint.
    let out = t.sh(
        &curl,
        "curl -s -w ' %{http_code}' -H 'x-envoy-upstream-rq-timeout-ms: 500' http://reviews:9080/reviews/0",
    );
    assert_eq!(
        out, "upstream request timeout 504",
        "x-envoy-upstream-rq-timeout-ms"
    );
    let out = t.sh(
        &curl,
        "curl -s -o /dev/null -w '%{http_code}' http://reviews:9080/reviews/0",
    );
    assert_eq!(out, "200", "without the header reviews answers after 2 s");

    t.apply(&reviews_v2(Some("0.5s")));
    t.eventually(
        "reviews timeout 0.5 s",
        WAIT,
        || t.page(None).0,
        |p| p.contains(REVIEWS_UNAVAILABLE),
    );
    let (page, took) = t.page(None);
    eprintln!("0.5 s reviews timeout: page in {took:?}");
    assert!(page.contains(REVIEWS_UNAVAILABLE), "{page}");
    assert!(took >= Duration::from_millis(900), "{took:?}");
    let out = t.sh(
        &curl,
        "curl -s -w ' %{http_code}' http://reviews:9080/reviews/0",
    );
    assert_eq!(out, "upstream request timeout 504", "route timeout");
}
