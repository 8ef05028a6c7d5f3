//! Which AWS-LC this build links, and its self-tests.
//!
//! A default build links AWS-LC (`aws-lc-sys`); a FIPS build (cargo feature `fips`, `make
//! install FIPS=1`) links AWS-LC's FIPS 140-3 module: `aws-lc-fips-sys` 0.13.11, which builds
//! AWS-LC-FIPS 3.1.0, the version FIPS 140-3 certificate #5314 (static library) validates
//! (`core/Cargo.toml` pins it; the self-test below refuses any other module version). It
//! runs only approved algorithms: AES-256-GCM with the GCM nonce drawn inside the module, HKDF
//! and HMAC with SHA-256, SHA-256, and the module's CTR_DRBG for every key, salt and nonce. It
//! refuses passphrases and Argon2id key versions (see [`crate::kdf`]).

/// True in a FIPS build.
pub const ENABLED: bool = cfg!(feature = "fips");

/// The module version FIPS 140-3 certificate #5314 validates, as the module names itself.
pub const CERTIFIED_MODULE: &str = "AWS-LC FIPS 3.1.0";

/// The version string of the linked FIPS module, read from the module itself
/// (`awslc_version_string()`): "AWS-LC FIPS 3.1.0" for the pinned one.
#[cfg(feature = "fips")]
#[allow(unsafe_code)]
pub fn linked_module_version() -> String {
    // SAFETY: returns a pointer to a static NUL-terminated string inside the module.
    let p = unsafe { aws_lc_fips_sys::awslc_version_string() };
    if p.is_null() {
        return String::new();
    }
    // SAFETY: non-null, NUL-terminated, static for the life of the process.
    unsafe { std::ffi::CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

/// The crypto module this build links, as `data_encryption_status` shows it. A FIPS build
/// names the version the module reports (the load-time self-test has checked it is the
/// certified one).
pub fn module() -> &'static str {
    static NAME: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    NAME.get_or_init(|| {
        #[cfg(feature = "fips")]
        {
            format!("{} (aws-lc-fips-sys 0.13.11; FIPS 140-3 certificate #5314)", linked_module_version())
        }
        #[cfg(not(feature = "fips"))]
        {
            "AWS-LC (aws-lc-sys, not the FIPS module)".to_owned()
        }
    })
}

/// True when the linked library runs in FIPS mode (only ever in a FIPS build, after its
/// power-on self-tests passed).
pub fn fips_mode() -> bool {
    aws_lc_rs::try_fips_mode().is_ok()
}

/// Why the crypto cannot be used: a self-test failed, or a FIPS build is not in FIPS mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SelfTestFailed(pub String);

impl std::fmt::Display for SelfTestFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Known-answer tests of what this crate runs, through its own code paths: AES-256-GCM
/// (NIST's vector), the value-key HKDF, HMAC-SHA256 (RFC 4231), and in a FIPS build the
/// module's FIPS mode (`FIPS_mode()`, which its power-on self-tests and integrity check
/// decide). `_PG_init` refuses to load the library when this fails. `break_test` names a test to
/// fail on purpose (the extension's fault-injection builds use it to test that refusal).
pub fn self_test(break_test: Option<&str>) -> Result<(), SelfTestFailed> {
    let fail = |name: &str, ok: bool| {
        if ok && break_test != Some(name) {
            Ok(())
        } else {
            Err(SelfTestFailed(format!("the {name} self-test failed")))
        }
    };
    #[cfg(feature = "fips")]
    {
        fail("FIPS mode", fips_mode())?;
        // The certificate covers one module version: a build that resolved another one
        // (a moved pin, a patched crate) must not claim it.
        if linked_module_version() != CERTIFIED_MODULE || break_test == Some("module version") {
            return Err(SelfTestFailed(format!(
                "the module version self-test failed: the linked module is \"{}\", certificate #5314 covers \"{CERTIFIED_MODULE}\"",
                linked_module_version()
            )));
        }
    }
    fail("AES-256-GCM", crate::cipher::gcm_known_answer())?;
    fail("HKDF-SHA256", crate::cipher::value_key_known_answer())?;
    fail("HMAC-SHA256", hmac_known_answer())?;
    Ok(())
}

/// RFC 4231, test case 2 (HMAC-SHA256).
fn hmac_known_answer() -> bool {
    use aws_lc_rs::hmac;
    let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, b"Jefe"), b"what do ya want for nothing?");
    tag.as_ref() == crate::cipher::hex_bytes("5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_tests_pass_and_a_broken_one_is_reported() {
        assert_eq!(self_test(None), Ok(()));
        assert_eq!(fips_mode(), ENABLED);
        let e = self_test(Some("AES-256-GCM")).unwrap_err();
        assert_eq!(e.to_string(), "the AES-256-GCM self-test failed");
        assert!(self_test(Some("HMAC-SHA256")).is_err());
    }

    #[cfg(feature = "fips")]
    #[test]
    fn the_fips_build_links_the_certified_module_version() {
        assert_eq!(linked_module_version(), CERTIFIED_MODULE);
        assert_eq!(module(), "AWS-LC FIPS 3.1.0 (aws-lc-fips-sys 0.13.11; FIPS 140-3 certificate #5314)");
        let e = self_test(Some("module version")).unwrap_err();
        assert!(e.to_string().contains("certificate #5314 covers \"AWS-LC FIPS 3.1.0\""), "{e}");
    }

    #[cfg(not(feature = "fips"))]
    #[test]
    fn the_default_build_does_not_claim_the_fips_module() {
        assert_eq!(module(), "AWS-LC (aws-lc-sys, not the FIPS module)");
        assert!(!fips_mode());
    }
}
