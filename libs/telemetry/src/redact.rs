//! Connection strings without their secrets, for logs and errors.

/// `url` with the password of its user info replaced by `***`
/// (`rediss://app:s3cr%40t@host:6380/0` → `rediss://app:***@host:6380/0`).
/// Works on any `scheme://user:password@hosts/…` string, including MongoDB
/// URIs with several hosts, which URL parsers refuse; a string without user
/// info comes back unchanged.
pub fn url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let rest_start = scheme_end + 3;
    let rest = &url[rest_start..];
    // The authority ends at the path, the query or the fragment.
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    // A password may itself contain a raw '@' (unencoded): the user info ends
    // at the last one.
    let Some(at) = authority.rfind('@') else {
        return url.to_owned();
    };
    let user_info = &authority[..at];
    let user = match user_info.find(':') {
        Some(colon) => &user_info[..colon],
        // Only a user name: still redacted, since Redis takes a lone user
        // info as the password (`redis://secret@host`).
        None if !user_info.is_empty() => "",
        None => return url.to_owned(),
    };
    format!(
        "{}{}:***@{}",
        &url[..rest_start],
        user,
        &url[rest_start + at + 1..]
    )
}

#[cfg(test)]
mod tests {
    use super::url;

    #[test]
    fn hides_the_password_and_keeps_the_rest() {
        assert_eq!(
            url("rediss://app:s3cr%40t@redis.internal:6380/0"),
            "rediss://app:***@redis.internal:6380/0"
        );
        assert_eq!(
            url("redis://:pw@127.0.0.1:6379/0"),
            "redis://:***@127.0.0.1:6379/0"
        );
        assert_eq!(
            url("mongodb://app:p@ss@m1:27017,m2:27017/db?replicaSet=rs0&tls=true"),
            "mongodb://app:***@m1:27017,m2:27017/db?replicaSet=rs0&tls=true"
        );
        assert_eq!(url("redis://secret@host/0"), "redis://:***@host/0");
    }

    #[test]
    fn leaves_urls_without_credentials_alone() {
        for plain in [
            "redis://127.0.0.1:6379/0",
            "mongodb://127.0.0.1:27017/?replicaSet=rs0",
            "mongodb://h/?authMechanism=MONGODB-X509&x=a@b",
            "not a url",
        ] {
            assert_eq!(url(plain), plain);
        }
    }
}
