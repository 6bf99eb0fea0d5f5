"""Routing by host and path (proxy/routing.py): pure, no I/O."""

from __future__ import annotations

import pytest

from bastion.proxy.config.model import Route
from bastion.proxy.edge.routing import Router, host_rank, normalise_host, path_matches


def app_of(router: Router, host: str, path: str) -> str | None:
    route = router.match(host, path)
    return None if route is None else route.app


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Shop.Example.com.:443", "shop.example.com"),
        ("SHOP.example.COM", "shop.example.com"),
        ("shop.example.com:8080", "shop.example.com"),
        ("shop.example.com.", "shop.example.com"),
        ("  shop.example.com  ", "shop.example.com"),
        ("127.0.0.1:8080", "127.0.0.1"),
        ("[::1]:8443", "[::1]"),
        ("[::1]", "[::1]"),
        ("[2001:DB8::1]:80", "[2001:db8::1]"),
        ("[0:0::1]:80", "[::1]"),
        ("::1", "[::1]"),
    ],
)
def test_normalise_host_lowercases_and_drops_port_and_trailing_dot(raw: str, expected: str) -> None:
    assert normalise_host(raw) == expected


def test_exact_host_matches_only_that_host() -> None:
    router = Router([Route("shop", hosts=("shop.example.com",))])
    assert app_of(router, "shop.example.com", "/") == "shop"
    assert app_of(router, "other.example.com", "/") is None
    assert app_of(router, "shop.example.com.evil", "/") is None


def test_host_match_ignores_case_port_and_trailing_dot() -> None:
    router = Router([Route("shop", hosts=("shop.example.com",))])
    assert app_of(router, "SHOP.Example.Com.:8443", "/x") == "shop"


def test_wildcard_matches_any_subdomain_depth_but_not_the_bare_domain() -> None:
    # Documented behaviour: "*.example.com" matches one or more labels in front of
    # example.com (a.example.com and a.b.example.com), never example.com itself.
    router = Router([Route("wild", hosts=("*.example.com",))])
    assert app_of(router, "a.example.com", "/") == "wild"
    assert app_of(router, "a.b.example.com", "/") == "wild"
    assert app_of(router, "example.com", "/") is None
    assert app_of(router, "badexample.com", "/") is None
    assert app_of(router, "a.example.com.org", "/") is None


def test_host_rank_orders_exact_over_longer_wildcard_over_shorter() -> None:
    host = "a.shop.example.com"
    exact = host_rank("a.shop.example.com", host)
    long_wild = host_rank("*.shop.example.com", host)
    short_wild = host_rank("*.example.com", host)
    assert exact > long_wild > short_wild > 0
    assert host_rank("*.example.com", "example.com") == -1
    assert host_rank("other.com", host) == -1


def test_ipv6_literal_host_matches_bracketed_pattern() -> None:
    router = Router([Route("v6", hosts=("[::1]",))])
    assert app_of(router, "[::1]:8080", "/") == "v6"
    assert app_of(router, "[::2]:8080", "/") is None


def test_ipv6_literal_host_matches_pattern_written_without_brackets() -> None:
    # The configuration accepts "::1" as a host; a client always sends "[::1]".
    router = Router([Route("v6", hosts=("::1",))])
    assert app_of(router, "[::1]:8080", "/") == "v6"
    assert app_of(router, "[0:0::1]", "/") == "v6"


def test_ipv4_literal_host() -> None:
    router = Router([Route("v4", hosts=("127.0.0.1",))])
    assert app_of(router, "127.0.0.1:8080", "/") == "v4"
    assert app_of(router, "127.0.0.2", "/") is None


@pytest.mark.parametrize(
    ("path", "matches"),
    [("/api", True), ("/api/", True), ("/api/x", True), ("/api/x/y", True),
     ("/apix", False), ("/ap", False), ("/", False), ("/other/api", False)],
)
def test_path_base_matches_on_segment_boundaries(path: str, matches: bool) -> None:
    assert path_matches("/api", path) is matches
    router = Router([Route("api", path="/api")])
    assert (app_of(router, "h", path) == "api") is matches


def test_root_path_matches_everything() -> None:
    assert path_matches("/", "/")
    assert path_matches("/", "/anything/at/all")


def test_longest_path_prefix_wins() -> None:
    router = Router([
        Route("root", path="/"),
        Route("api", path="/api"),
        Route("v2", path="/api/v2"),
    ])
    assert app_of(router, "h", "/") == "root"
    assert app_of(router, "h", "/apix") == "root"
    assert app_of(router, "h", "/api") == "api"
    assert app_of(router, "h", "/api/v1/x") == "api"
    assert app_of(router, "h", "/api/v2") == "v2"
    assert app_of(router, "h", "/api/v2/x") == "v2"
    assert app_of(router, "h", "/api/v22") == "api"


def test_route_order_does_not_decide_longest_path() -> None:
    router = Router([Route("v2", path="/api/v2"), Route("api", path="/api"), Route("root")])
    assert app_of(router, "h", "/api/v2/x") == "v2"
    assert app_of(router, "h", "/api/x") == "api"


def test_host_specificity_beats_path_length() -> None:
    router = Router([
        Route("any-deep", path="/shop/cart"),
        Route("wild", hosts=("*.example.com",), path="/shop"),
        Route("exact", hosts=("shop.example.com",), path="/"),
    ])
    assert app_of(router, "shop.example.com", "/shop/cart/1") == "exact"
    assert app_of(router, "x.example.com", "/shop/cart/1") == "wild"
    assert app_of(router, "elsewhere.org", "/shop/cart/1") == "any-deep"


def test_longer_wildcard_beats_shorter_wildcard() -> None:
    router = Router([
        Route("short", hosts=("*.example.com",)),
        Route("long", hosts=("*.shop.example.com",)),
    ])
    assert app_of(router, "a.shop.example.com", "/") == "long"
    assert app_of(router, "a.blog.example.com", "/") == "short"


def test_host_without_matching_path_falls_back_to_any_host_app() -> None:
    router = Router([
        Route("shop-api", hosts=("shop.example.com",), path="/api"),
        Route("catchall", path="/"),
    ])
    assert app_of(router, "shop.example.com", "/api/x") == "shop-api"
    assert app_of(router, "shop.example.com", "/index.html") == "catchall"
    assert app_of(router, "unknown.org", "/api/x") == "catchall"


def test_no_match_returns_none() -> None:
    router = Router([
        Route("shop", hosts=("shop.example.com",)),
        Route("api", path="/api"),
    ])
    assert router.match("other.org", "/") is None
    assert router.match("other.org", "/apix") is None
    assert Router([]).match("shop.example.com", "/") is None


def test_route_with_several_hosts_takes_its_best_pattern() -> None:
    router = Router([
        Route("multi", hosts=("*.example.com", "www.example.org")),
        Route("wild-org", hosts=("*.example.org",)),
    ])
    assert app_of(router, "www.example.org", "/") == "multi"
    assert app_of(router, "a.example.com", "/") == "multi"
    assert app_of(router, "b.example.org", "/") == "wild-org"
