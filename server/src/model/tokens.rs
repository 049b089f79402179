//! Token counts the server makes itself, for answers whose provider never reported usage:
//! providers report it at the end of a stream, so a stopped or failed answer has none. The
//! prompt and the output are counted with the model's tokenizer (OpenAI's BPE vocabularies,
//! chosen by model name), and the result is marked as an estimate: the provider may count
//! framing differently, and for models that are not OpenAI's the vocabulary is only the
//! nearest guess.

use tiktoken_rs::{
    CoreBPE, cl100k_base_singleton, o200k_base_singleton,
    tokenizer::{Tokenizer, get_tokenizer},
};
use wadi_protocol::Usage;

use super::ChatMessage;

/// Framing tokens around each message of a chat prompt (`<|start|>role…<|end|>`), and the
/// tokens that prime the reply, as OpenAI's cookbook counts them for its current chat models.
const PER_MESSAGE: usize = 3;
const REPLY_PRIMING: usize = 3;

/// The vocabulary `model` is encoded with: `cl100k_base` for GPT-4 and GPT-3.5, `o200k_base`
/// for GPT-4o, GPT-4.1, GPT-5, the o-series and anything unknown (the vocabulary of current
/// models, so the closest guess for the others).
fn vocabulary(model: &str) -> &'static CoreBPE {
    match get_tokenizer(model) {
        Some(Tokenizer::Cl100kBase) => cl100k_base_singleton(),
        _ => o200k_base_singleton(),
    }
}

/// The usage of a request that sent `prompt` to `model` and got `output` back, counted here.
/// The first call for a vocabulary loads it (tens of milliseconds, more in a debug build):
/// call it off the async workers.
pub fn estimate(model: &str, prompt: &[ChatMessage], output: &str) -> Usage {
    let bpe = vocabulary(model);
    let prompt_tokens = prompt
        .iter()
        .map(|message| {
            PER_MESSAGE
                + bpe.count_ordinary(message.role.as_str())
                + bpe.count_ordinary(&message.content)
        })
        .sum::<usize>()
        + REPLY_PRIMING;
    let completion_tokens = bpe.count_ordinary(output);
    let prompt_tokens = u32::try_from(prompt_tokens).unwrap_or(u32::MAX);
    let completion_tokens = u32::try_from(completion_tokens).unwrap_or(u32::MAX);
    Usage {
        prompt_tokens,
        completion_tokens,
        total_tokens: prompt_tokens.saturating_add(completion_tokens),
        estimated: true,
    }
}

#[cfg(test)]
mod tests {
    use wadi_protocol::api::Role;

    use super::*;

    fn message(role: Role, content: &str) -> ChatMessage {
        ChatMessage {
            role,
            content: content.to_owned(),
        }
    }

    #[test]
    fn counts_match_openai_s_published_figures() {
        // OpenAI's cookbook ("How to count tokens with tiktoken") gives these counts for its
        // example: "tiktoken is great!" is 6 tokens in cl100k_base and o200k_base alike.
        assert_eq!(
            estimate("gpt-4", &[], "tiktoken is great!").completion_tokens,
            6
        );
        assert_eq!(
            estimate("gpt-4o", &[], "tiktoken is great!").completion_tokens,
            6
        );
        // The vocabularies differ where it shows: o200k_base has whole-word tokens cl100k_base
        // splits.
        let text = "Les bénévoles coordonnent l'événement annuel à Montréal.";
        assert_ne!(
            estimate("gpt-4", &[], text).completion_tokens,
            estimate("gpt-4o", &[], text).completion_tokens
        );
    }

    #[test]
    fn a_prompt_counts_each_message_with_its_framing() {
        let prompt = [
            message(Role::System, "You are terse."),
            message(Role::User, "Hello!"),
        ];
        let usage = estimate("gpt-4o-mini", &prompt, "Hi.");
        let bpe = o200k_base_singleton();
        let words = bpe.count_ordinary("system")
            + bpe.count_ordinary("You are terse.")
            + bpe.count_ordinary("user")
            + bpe.count_ordinary("Hello!");
        assert_eq!(
            usage.prompt_tokens as usize,
            words + 2 * PER_MESSAGE + REPLY_PRIMING
        );
        assert_eq!(usage.completion_tokens as usize, bpe.count_ordinary("Hi."));
        assert_eq!(
            usage.total_tokens,
            usage.prompt_tokens + usage.completion_tokens
        );
        assert!(usage.estimated);
    }

    #[test]
    fn text_that_looks_like_a_special_token_is_counted_as_text() {
        // A user may type `<|endoftext|>`; the provider reads it as text, and so does the count.
        let usage = estimate("gpt-4o", &[], "<|endoftext|>");
        assert!(usage.completion_tokens > 1);
    }

    #[test]
    fn an_empty_answer_costs_its_prompt_only() {
        let usage = estimate("llama3.1:8b", &[message(Role::User, "Hi")], "");
        assert_eq!(usage.completion_tokens, 0);
        assert!(usage.prompt_tokens > 0);
    }
}
