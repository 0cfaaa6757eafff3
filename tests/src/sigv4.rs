//! Request targets whose SigV4 canonical form is easy to get wrong, with
//! the path and query that must reach the service for the signature to
//! verify: the path as sent (no normalization: Lattice signs it as is), the
//! query in the app's order with only ambiguous pairs re-encoded (`+`,
//! lowercase hex, escaped unreserved, raw reserved characters). The
//! loopback and the in-pod signing tests both send every one.

/// (request target, path that must arrive, query that must arrive).
pub const ENCODING_CASES: &[(&str, &str, &str)] = &[
    ("/", "/", ""),
    (
        "/a%20b/c:d@e!$&'()*+,;=/%E2%82%AC",
        "/a%20b/c:d@e!$&'()*+,;=/%E2%82%AC",
        "",
    ),
    (
        "/api/v1/items/%7Bid%7D/~user/a+b/%2Fslash;v=1/x%20y:z@w!$&'()*,=",
        "/api/v1/items/%7Bid%7D/~user/a+b/%2Fslash;v=1/x%20y:z@w!$&'()*,=",
        "",
    ),
    ("/x/./y/../z//w/", "/x/./y/../z//w/", ""),
    ("/a/../b/./c//d/", "/a/../b/./c//d/", ""),
    ("/%C3%A9t%C3%A9/%E2%82%AC", "/%C3%A9t%C3%A9/%E2%82%AC", ""),
    ("/q?b=2&a=1", "/q", "b=2&a=1"),
    (
        "/q?sp=a+b&slash=a%2fb&tilde=%7e&empty&u=%E2%82%AC&r=:@!$'()*,;",
        "/q",
        "sp=a%20b&slash=a%2Fb&tilde=~&empty&u=%E2%82%AC&r=%3A%40%21%24%27%28%29%2A%2C%3B",
    ),
    ("/q?a=1&a=0&A=2", "/q", "a=1&a=0&A=2"),
    (
        "/search?sort=-date&filter=name%3D%22x%22&page[size]=10&q=caf%C3%A9+au+lait&flag&%24top=5",
        "/search",
        "sort=-date&filter=name%3D%22x%22&page%5Bsize%5D=10&q=caf%C3%A9%20au%20lait&flag&%24top=5",
    ),
    ("/v?b=%2b&a=%20&a=+&c=%7E~", "/v", "b=%2B&a=%20&a=%20&c=~~"),
    ("/e?k=&=x", "/e", "k=&=x"),
];
