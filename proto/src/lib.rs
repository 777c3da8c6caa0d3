//! `fathom-proto`: the generated gRPC types of package `fathom.v1` and the encoded file
//! descriptor set used for server reflection.
//!
//! Owns the wire contract only; no behaviour lives here.

#![allow(missing_debug_implementations)]
#![allow(clippy::all)]

/// Generated code for package `fathom.v1`.
pub mod v1 {
    tonic::include_proto!("fathom.v1");
}

/// Encoded `FileDescriptorSet` of every Fathom proto, for `tonic-reflection`.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("fathom_descriptor");

#[cfg(test)]
mod tests {
    use super::v1;
    use prost::Message;

    #[test]
    fn descriptor_set_names_every_service() {
        let text = String::from_utf8_lossy(super::FILE_DESCRIPTOR_SET);
        for name in ["Inference", "Admin", "Worker", "GenerateRequest", "StepRequest", "Plan"] {
            assert!(text.contains(name), "descriptor set lacks {name}");
        }
    }

    #[test]
    fn generate_request_round_trips_with_oneof_input() {
        let req = v1::GenerateRequest {
            request_id: "r-1".into(),
            input: Some(v1::generate_request::Input::TokenIds(v1::TokenIds {
                ids: vec![0, 5, 17],
            })),
            sampling: Some(v1::SamplingParams {
                temperature: 0.7,
                top_k: 40,
                seed: Some(3),
                max_tokens: 8,
                ..Default::default()
            }),
            options: None,
        };
        let back = v1::GenerateRequest::decode(req.encode_to_vec().as_slice()).unwrap();
        assert_eq!(back, req);
        assert_eq!(back.sampling.unwrap().seed, Some(3));
    }
}
