use super::*;

#[test]
fn names_are_valid_gce_names_and_stable() {
    assert_eq!(
        instance_name("sb-0a1b2c3d-train-cpu-2"),
        "sb-0a1b2c3d-train-cpu-2"
    );
    for label in [
        "sb-0a1b2c3d-Train_Run.7-cpu-1",
        &format!("sb-0a1b2c3d-{}-cpu-1", "x".repeat(60)),
        "9lives",
    ] {
        let n = instance_name(label);
        assert!(valid_name(&n), "{label} -> {n}");
        assert_eq!(n, instance_name(label));
    }
    assert_ne!(
        instance_name("sb-0a1b2c3d-A-cpu-1"),
        instance_name("sb-0a1b2c3d-a_-cpu-1")
    );
}

#[test]
fn request_ids_are_uuids_derived_from_the_label() {
    let a = request_id("sb-1-p-cpu-1");
    assert_eq!(a, request_id("sb-1-p-cpu-1"));
    assert_ne!(a, request_id("sb-1-p-cpu-2"));
    let parts: Vec<&str> = a.split('-').collect();
    assert_eq!(
        parts.iter().map(|p| p.len()).collect::<Vec<_>>(),
        vec![8, 4, 4, 4, 12]
    );
    assert!(parts[2].starts_with('4'));
}

#[test]
fn operation_errors_blocklist_the_right_scope() {
    let z = "europe-west4-b";
    match classify("ZONE_RESOURCE_POOL_EXHAUSTED", "no e2", z, "create") {
        ProviderError::Unavailable { place, .. } => assert_eq!(place, z),
        e => panic!("{e:?}"),
    }
    match classify("QUOTA_EXCEEDED", "CPUS", z, "create") {
        ProviderError::Unavailable { place, .. } => assert_eq!(place, "europe-west4"),
        e => panic!("{e:?}"),
    }
    assert!(classify("RESOURCE_OPERATION_RATE_EXCEEDED", "", z, "create").transient());
    assert!(matches!(
        classify("INVALID_FIELD_VALUE", "", z, "create"),
        ProviderError::Rejected(_)
    ));
}

#[test]
fn instances_map_to_machines() {
    let v = json!({
        "name": "sb-1-p-cpu-1",
        "zone": "https://compute.googleapis.com/compute/v1/projects/x/zones/us-east1-b",
        "status": "TERMINATED",
        "metadata": {"items": [{"key": "standby-label", "value": "sb-1-P-cpu-1"}]},
    });
    let m = Gcp::machine(&v).unwrap();
    assert_eq!(m.id, "us-east1-b/sb-1-p-cpu-1");
    assert_eq!(m.label, "sb-1-P-cpu-1");
    assert_eq!(m.state, MachineState::Stopped);
    assert_eq!(m.place, "us-east1-b");
    assert!(Gcp::machine(&json!({"name": "x"})).is_err());
    assert!(Gcp::split_id("nozone").is_err());
    assert!(Gcp::split_id("a/b/c").is_err());
}

#[test]
fn a_bad_key_file_is_a_clear_error() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("k.json");
    std::fs::write(
        &p,
        r#"{"type":"authorized_user","client_email":"a","private_key":"","token_uri":"x"}"#,
    )
    .unwrap();
    let e = ServiceAccount::load(&p).err().unwrap().to_string();
    assert!(e.contains("not a service_account"), "{e}");
    std::fs::write(&p, "not json").unwrap();
    assert!(ServiceAccount::load(&p).is_err());
    std::fs::write(&p, r#"{"type":"service_account","client_email":"a","private_key":"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n","token_uri":"x"}"#).unwrap();
    let e = ServiceAccount::load(&p).err().unwrap().to_string();
    assert!(e.contains("not an RSA"), "{e}");
}

#[test]
fn the_assertion_is_a_verifiable_rs256_jwt() {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gcp-service-account.json");
    let sa = ServiceAccount::load(&p).unwrap();
    let jwt = sa.assertion(1_700_000_000).unwrap();
    let parts: Vec<&str> = jwt.split('.').collect();
    assert_eq!(parts.len(), 3);
    let dec = |s: &str| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(s)
            .unwrap()
    };
    let claims: Value = serde_json::from_slice(&dec(parts[1])).unwrap();
    assert_eq!(claims["iss"], sa.email.as_str());
    assert_eq!(claims["aud"], sa.token_uri.as_str());
    assert_eq!(claims["scope"], SCOPE);
    assert_eq!(claims["exp"], 1_700_003_600u64);
    use ring::signature::KeyPair;
    let public = ring::signature::UnparsedPublicKey::new(
        &ring::signature::RSA_PKCS1_2048_8192_SHA256,
        sa.key.public_key().as_ref().to_vec(),
    );
    let msg = format!("{}.{}", parts[0], parts[1]);
    public.verify(msg.as_bytes(), &dec(parts[2])).unwrap();
    let mut bad = dec(parts[2]);
    bad[0] ^= 1;
    assert!(public.verify(msg.as_bytes(), &bad).is_err());
}
