//! Certificates of a test's own, made with the `openssl` command: a private
//! CA, a server certificate for 127.0.0.1/localhost and a client
//! certificate, all signed by that CA (PEM files in a directory).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// A CA with a server and a client certificate, in `dir`.
#[derive(Debug, Clone)]
pub struct TestCa {
    pub dir: PathBuf,
}

impl TestCa {
    /// Generates the CA and both certificates into `dir` (created). Panics
    /// when `openssl` is missing or fails.
    pub fn generate(dir: &Path) -> Self {
        std::fs::create_dir_all(dir)
            .unwrap_or_else(|err| panic!("cannot create {}: {err}", dir.display()));
        let ca = Self {
            dir: dir.to_owned(),
        };
        ca.openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=test-ca",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
        ]);
        // X.509 v3 (rustls refuses older certificates): the extensions make it so.
        ca.issue(
            "server",
            "/CN=localhost",
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth",
        );
        ca.issue("client", "/CN=test-client", "extendedKeyUsage=clientAuth");
        ca
    }

    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    pub fn server_cert(&self) -> PathBuf {
        self.dir.join("server.crt")
    }

    pub fn server_key(&self) -> PathBuf {
        self.dir.join("server.key")
    }

    pub fn client_cert(&self) -> PathBuf {
        self.dir.join("client.crt")
    }

    pub fn client_key(&self) -> PathBuf {
        self.dir.join("client.key")
    }

    /// `name.key` and `name.crt` signed by the CA, with `extensions` (one
    /// per line, e.g. the server's subjectAltName).
    fn issue(&self, name: &str, subject: &str, extensions: &str) {
        let key = format!("{name}.key");
        let csr = format!("{name}.csr");
        let crt = format!("{name}.crt");
        self.openssl(&[
            "req", "-newkey", "rsa:2048", "-nodes", "-subj", subject, "-keyout", &key, "-out", &csr,
        ]);
        let ext_file = format!("{name}.ext");
        std::fs::write(self.dir.join(&ext_file), format!("{extensions}\n"))
            .unwrap_or_else(|err| panic!("cannot write {ext_file}: {err}"));
        self.openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &ext_file,
            "-out",
            &crt,
        ]);
    }

    fn openssl(&self, args: &[&str]) {
        let output = Command::new("openssl")
            .args(args)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|err| panic!("cannot run openssl: {err}"));
        assert!(
            output.status.success(),
            "openssl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}
