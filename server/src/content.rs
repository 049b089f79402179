//! What a valid message is, and what a conversation is called after its first one. The same
//! rules hold over REST and WebSocket.

use wadi_protocol::ErrorCode;

use crate::error::AppError;

/// Longest `clientMessageId` accepted, in characters.
const MAX_CLIENT_MESSAGE_ID_CHARS: usize = 128;
/// Length of a title derived from the first message, in characters.
const DERIVED_TITLE_CHARS: usize = 60;

/// Refuses text holding U+0000 (NUL). Postgres cannot store it, and no message or name means
/// one; refused on every store alike, so a conversation moves between them unchanged.
pub fn check_no_nul(field: &str, text: &str) -> Result<(), AppError> {
    if text.contains('\0') {
        return Err(AppError::invalid(
            ErrorCode::InvalidMessage,
            format!("{field} must not contain the character U+0000 (NUL)"),
        ));
    }
    Ok(())
}

/// Checks a message's content and client id; the same rules hold on the WebSocket.
pub fn check_message(
    content: &str,
    client_message_id: Option<&str>,
    max_content_bytes: usize,
) -> Result<(), AppError> {
    check_no_nul("message content", content)?;
    if let Some(id) = client_message_id {
        check_no_nul("clientMessageId", id)?;
    }
    if is_blank(content) {
        return Err(AppError::invalid(
            ErrorCode::EmptyContent,
            "message content must not be empty",
        ));
    }
    if content.len() > max_content_bytes {
        return Err(AppError::TooLarge(format!(
            "message content must be at most {max_content_bytes} bytes"
        )));
    }
    if let Some(id) = client_message_id
        && (id.is_empty() || id.chars().count() > MAX_CLIENT_MESSAGE_ID_CHARS)
    {
        return Err(AppError::invalid(
            ErrorCode::InvalidMessage,
            format!("clientMessageId must be 1 to {MAX_CLIENT_MESSAGE_ID_CHARS} characters"),
        ));
    }
    Ok(())
}

/// True if nothing in `text` would show: whitespace, and the invisible format characters
/// (zero-width spaces and joiners, the word joiner, byte order marks) that `trim` keeps.
pub fn is_blank(text: &str) -> bool {
    text.chars()
        .all(|c| c.is_whitespace() || is_invisible_format(c))
}

/// Zero-width characters, bidirectional marks and controls: they show nothing themselves.
fn is_invisible_format(c: char) -> bool {
    is_bidi_control(c)
        || matches!(
            c,
            '\u{200B}'..='\u{200F}' | '\u{2060}' | '\u{061C}' | '\u{FEFF}'
        )
}

/// Bidirectional embeddings, overrides and isolates: a title holding one can show its text
/// reversed or spill its direction into what follows it. (The marks, LRM, RLM and ALM, have no
/// scope: right-to-left writers use them to place punctuation and numbers, and they stay.)
pub fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

/// A title on one line: control characters (line breaks, tabs, terminal escapes) become
/// spaces, so that a title cannot break the lines it is shown on (the export's heading, a
/// terminal, a log), and bidirectional controls are left out, so that it reads as typed.
pub fn one_line(title: &str) -> String {
    title
        .chars()
        .filter(|&c| !is_bidi_control(c))
        .map(|c| {
            if c.is_control() || matches!(c, '\u{2028}' | '\u{2029}') {
                ' '
            } else {
                c
            }
        })
        .collect::<String>()
        .trim()
        .to_owned()
}

/// The title a conversation gets from its first message: the start of its first line.
pub fn derive_title(content: &str) -> String {
    use unicode_segmentation::UnicodeSegmentation;
    let line = content
        .lines()
        .map(one_line)
        .find(|line| !is_blank(line))
        .unwrap_or_default();
    // Cut between user-perceived characters: an emoji made of several (a family, a flag, a
    // skin tone) is kept whole or left out, never shown in pieces.
    if line.graphemes(true).count() <= DERIVED_TITLE_CHARS {
        line
    } else {
        let cut: String = line.graphemes(true).take(DERIVED_TITLE_CHARS - 1).collect();
        format!("{}…", cut.trim_end())
    }
}

/// How the export's Markdown is read: as the app reads it, and as viewers that follow GitHub's
/// flavour do.
fn export_options() -> pulldown_cmark::Options {
    use pulldown_cmark::Options;
    Options::ENABLE_TABLES | Options::ENABLE_STRIKETHROUGH | Options::ENABLE_TASKLISTS
}

/// Follows a turn in `sealed`'s check: still a paragraph of its own after the turn, or the turn
/// would swallow the next one.
const TURN_END: &str = "wadi-turn-end";

/// A message's content as it goes into the Markdown export: shown as the app shows it, and
/// sealed so that nothing in it reaches into the turns after it. Raw HTML is backslash-escaped
/// (the app shows it as text; a viewer would render it, and an unclosed `<!--` or `<script>`
/// would hide every later turn), and a fenced code block left open (an answer stopped
/// mid-block) is closed.
fn sealed(content: &str) -> String {
    use pulldown_cmark::{CodeBlockKind, Event, Parser, Tag};
    let content = content.trim_end();
    let escaped = Parser::new_ext(content, export_options())
        .into_offset_iter()
        .filter(|(event, _)| matches!(event, Event::Html(_) | Event::InlineHtml(_)))
        .map(|(_, range)| {
            let mut html = String::with_capacity(range.len() * 2);
            for c in content[range.clone()].chars() {
                if c.is_ascii_punctuation() {
                    html.push('\\');
                }
                html.push(c);
            }
            (range, html)
        })
        .collect();
    let mut out = apply_edits(content, escaped);
    if !swallows_what_follows(&out) {
        return out;
    }
    // Escaped, the HTML is Markdown again: the fence left open is found in what is written.
    let last_fence = Parser::new_ext(&out, export_options())
        .into_offset_iter()
        .filter_map(|(event, range)| {
            matches!(
                event,
                Event::Start(Tag::CodeBlock(CodeBlockKind::Fenced(_)))
            )
            .then_some(range)
        })
        .last();
    if let Some(fence) = last_fence {
        let opening = out[fence].trim_start();
        let marker = opening.chars().next().unwrap_or('`');
        let length = opening.chars().take_while(|&c| c == marker).count();
        out.push('\n');
        out.extend(std::iter::repeat_n(marker, length.max(3)));
    }
    out
}

/// Rounds of `own_labels` for labels defined more than once: each round renames one more
/// definition of each. Past it (only content made to defeat it), a later duplicate may still
/// serve another turn's text, which is all it costs: a bound on the work, not on correctness.
const LABEL_ROUNDS: usize = 8;

/// `content` with its link reference labels made its own: a definition (`[x]: https://…`)
/// applies to the whole document it is in, but the app renders each message on its own, so in
/// the export each turn's labels get `prefix` (its own, and not to be guessed from the content
/// of one turn), in its references (`[text]`, `[text][]` and `[text][x]` all become
/// `[text][<prefix>…]`) and its definitions.
fn own_labels(content: &str, prefix: &str) -> String {
    use pulldown_cmark::{Event, LinkType, Parser, Tag};
    let mut edits: Vec<(std::ops::Range<usize>, String)> = Vec::new();
    let mut parser = Parser::new_ext(content, export_options()).into_offset_iter();
    for (event, range) in parser.by_ref() {
        let (Event::Start(Tag::Link { link_type, .. })
        | Event::Start(Tag::Image { link_type, .. })) = event
        else {
            continue;
        };
        let source = &content[range.clone()];
        let text_start = if source.starts_with('!') { 2 } else { 1 };
        match link_type {
            LinkType::Shortcut if source.ends_with(']') && source.len() > text_start => {
                let label = &source[text_start..source.len() - 1];
                edits.push((range.end..range.end, format!("[{prefix}{label}]")));
            }
            LinkType::Collapsed if source.ends_with("][]") => {
                let label = &source[text_start..source.len() - 3];
                edits.push((range.end - 2..range.end, format!("[{prefix}{label}]")));
            }
            // pulldown-cmark 0.13 ends a collapsed link's range before its `[]`.
            LinkType::Collapsed
                if source.ends_with(']')
                    && source.len() > text_start
                    && content[range.end..].starts_with("[]") =>
            {
                let label = &source[text_start..source.len() - 1];
                edits.push((range.end..range.end + 2, format!("[{prefix}{label}]")));
            }
            LinkType::Reference if source.ends_with(']') => {
                if let Some(at) = source.rfind("][") {
                    let label = &source[at + 2..source.len() - 1];
                    let start = range.start + at + 1;
                    edits.push((start..range.end, format!("[{prefix}{label}]")));
                }
            }
            _ => {}
        }
    }
    for (_, definition) in parser.reference_definitions().iter() {
        let at = definition.span.start + 1;
        edits.push((at..at, prefix.to_owned()));
    }
    let mut out = apply_edits(content, edits);
    // A label defined twice: the second definition is not in the map until the first is
    // renamed. Each round renames the definitions still without the prefix.
    for _ in 0..LABEL_ROUNDS {
        let parser = Parser::new_ext(&out, export_options()).into_offset_iter();
        let unrenamed: Vec<_> = parser
            .reference_definitions()
            .iter()
            .map(|(_, definition)| definition.span.start + 1)
            .filter(|&at| !out[at..].starts_with(prefix))
            .map(|at| (at..at, prefix.to_owned()))
            .collect();
        if unrenamed.is_empty() {
            break;
        }
        out = apply_edits(&out, unrenamed);
    }
    out
}

/// `text` with each range replaced; ranges that overlap an earlier one are left out.
fn apply_edits(text: &str, mut edits: Vec<(std::ops::Range<usize>, String)>) -> String {
    edits.sort_by_key(|(range, _)| (range.start, range.end));
    let mut out = String::with_capacity(text.len() + edits.len() * 16);
    let mut copied = 0;
    for (range, replacement) in edits {
        if range.start < copied {
            continue;
        }
        out.push_str(&text[copied..range.start]);
        out.push_str(&replacement);
        copied = range.end;
    }
    out.push_str(&text[copied..]);
    out
}

/// True if a paragraph after `text` (past a blank line) would be read as part of a code block
/// of `text`'s.
fn swallows_what_follows(text: &str) -> bool {
    use pulldown_cmark::{Event, Parser, Tag, TagEnd};
    let probe = format!("{text}\n\n{TURN_END}");
    let mut in_code = false;
    for event in Parser::new_ext(&probe, export_options()) {
        match event {
            Event::Start(Tag::CodeBlock(_)) => in_code = true,
            Event::End(TagEnd::CodeBlock) => in_code = false,
            Event::Text(text) if in_code && text.contains(TURN_END) => return true,
            _ => {}
        }
    }
    false
}

/// A conversation's branch as Markdown, for people: the title, then each message under who
/// wrote it (and, for answers, the model), in order.
pub fn markdown_export(
    conversation: &wadi_protocol::api::Conversation,
    messages: &[wadi_protocol::api::Message],
) -> String {
    use std::fmt::Write;
    use wadi_protocol::api::Role;
    let when = |at: time::OffsetDateTime| {
        at.format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default()
    };
    let mut out = format!("# {}\n\n", one_line(&conversation.title));
    let _ = writeln!(
        out,
        "_Exported from WADI. Started {}, last changed {}._\n",
        when(conversation.created_at),
        when(conversation.updated_at)
    );
    // Labels are prefixed with a digest of the whole branch: no turn can name another's.
    let digest = {
        use sha2::{Digest, Sha256};
        let mut hasher = Sha256::new();
        for message in messages {
            hasher.update(message.content.as_bytes());
            hasher.update([0]);
        }
        crate::util::hex(&hasher.finalize()[..6])
    };
    for (turn, message) in messages.iter().enumerate() {
        let who = match (message.role, &message.model) {
            (Role::User, _) => "You".to_owned(),
            (Role::Assistant, Some(model)) => format!("Assistant ({model})"),
            (Role::Assistant, None) => "Assistant".to_owned(),
            (Role::System, _) => "System".to_owned(),
        };
        let _ = writeln!(out, "**{who}** · {}\n", when(message.created_at));
        let _ = writeln!(
            out,
            "{}\n",
            sealed(&own_labels(
                &message.content,
                &format!("wadi-{digest}-{turn}-")
            ))
        );
        if let Some(status) = message
            .run_status
            .filter(|status| !matches!(status, wadi_protocol::RunStatus::Completed))
        {
            let _ = writeln!(out, "_({})_\n", status.as_str());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_turn_of_an_export_reaches_into_the_next() {
        use pulldown_cmark::{Event, Parser, Tag, TagEnd};
        use wadi_protocol::api::{Conversation, Message, Role};
        let epoch = time::OffsetDateTime::UNIX_EPOCH;
        let contents = [
            "Show me\n```rust\nfn main() {",
            "<!-- the rest is a comment",
            "<script>alert(1)",
            "~~~~\nclosed too short\n~~~",
            "<textarea>\n\nstill in it",
            "> ```\n> quoted fence",
            "- ```\n  listed fence",
            "<pre>\n```\nfenced after HTML",
            "```\na\n```\n<div>\n~~~~\nb",
            "<div>\n`<b>`\n# not a heading",
            "see [the docs], [this][d], [pic][] and ![a][pic]\n\n[the docs]: https://a.example\n\
             [D]: https://b.example\n[d]: https://evil.example\n[pic]: https://c.example/p.png",
            "[d], [the docs][], [pic] and [x][wadi-turn-8-d] are text here",
            "the end <b>bold?</b>",
        ];
        let messages: Vec<Message> = contents
            .iter()
            .enumerate()
            .map(|(index, content)| Message {
                id: uuid::Uuid::nil(),
                conversation_id: uuid::Uuid::nil(),
                role: if index % 2 == 0 {
                    Role::User
                } else {
                    Role::Assistant
                },
                content: (*content).to_owned(),
                run_id: None,
                run_status: None,
                client_message_id: None,
                created_at: epoch,
                parent_id: None,
                siblings: Vec::new(),
                model: None,
                usage: None,
            })
            .collect();
        let conversation = Conversation {
            id: uuid::Uuid::nil(),
            title: "t".into(),
            created_at: epoch,
            updated_at: epoch,
            model: None,
            system_prompt: None,
        };
        let export = markdown_export(&conversation, &messages);
        // Every turn's "who" is read as bold text outside any code block, and nothing is HTML.
        let mut in_code = false;
        let mut in_strong = false;
        let mut who = Vec::new();
        let mut text = String::new();
        let mut links = Vec::new();
        for event in Parser::new_ext(&export, export_options()) {
            match event {
                Event::Start(Tag::CodeBlock(_)) => in_code = true,
                Event::End(TagEnd::CodeBlock) => in_code = false,
                Event::Start(Tag::Strong) => in_strong = true,
                Event::End(TagEnd::Strong) => in_strong = false,
                Event::Text(piece) if in_strong && !in_code => who.push(piece.to_string()),
                Event::Html(html) | Event::InlineHtml(html) => panic!("HTML {html:?} in {export}"),
                Event::Start(Tag::Link { dest_url, .. } | Tag::Image { dest_url, .. }) => {
                    links.push((who.len() - 1, dest_url.to_string()));
                }
                Event::Text(piece) => text.push_str(&piece),
                _ => {}
            }
        }
        let expected: Vec<&str> = (0..contents.len())
            .map(|index| if index % 2 == 0 { "You" } else { "Assistant" })
            .collect();
        assert_eq!(who, expected, "{export}");
        // A turn's link reference definitions serve that turn only, as in the app, which
        // renders each message on its own; the second definition of a label serves nobody.
        let defining = contents.len() - 3;
        assert_eq!(
            links,
            [
                (defining, "https://a.example".to_owned()),
                (defining, "https://b.example".to_owned()),
                (defining, "https://c.example/p.png".to_owned()),
                (defining, "https://c.example/p.png".to_owned()),
            ],
            "{export}"
        );
        // What the app shows as text is there as text.
        for shown in [
            "<!-- the rest is a comment",
            "<script>alert(1)",
            "<b>bold?</b>",
            "fn main() {",
            "`<b>`",
            "# not a heading",
        ] {
            assert!(text.contains(shown), "{shown:?} in {export}");
        }
        // Every definition of a label defined more than once is renamed (up to the rounds).
        assert_eq!(
            own_labels("[a]\n\n[a]: /x\n[A]: /y\n[a]: /z", "p-"),
            "[a][p-a]\n\n[p-a]: /x\n[p-A]: /y\n[p-a]: /z"
        );
        // A fence is closed only where it was left open.
        assert_eq!(sealed("```\ncode\n```"), "```\ncode\n```");
        assert_eq!(sealed("````md\n```\n"), "````md\n```\n````");
        assert_eq!(sealed("  ~~~\nx"), "  ~~~\nx\n~~~");
    }

    #[test]
    fn titles_come_from_the_first_line() {
        assert_eq!(derive_title("\n  Hello there  \nsecond"), "Hello there");
        let long = "word ".repeat(30);
        let title = derive_title(&long);
        assert!(title.ends_with('…'));
        assert!(title.chars().count() <= DERIVED_TITLE_CHARS);
        assert_eq!(derive_title("\ttabbed\x1b[31m red"), "tabbed [31m red");
        assert_eq!(derive_title("\u{200B}\u{FEFF}\nsecond line"), "second line");
        assert_eq!(
            derive_title("\u{7}\nHello"),
            "Hello",
            "a line of control characters"
        );
        assert_eq!(derive_title("one\u{2028}two"), "one two");
        let family = "👨\u{200D}👩\u{200D}👧\u{200D}👦";
        let title = derive_title(&family.repeat(70));
        assert_eq!(
            title,
            format!("{}…", family.repeat(DERIVED_TITLE_CHARS - 1))
        );
    }

    #[test]
    fn invisible_characters_alone_are_blank() {
        assert!(is_blank(" \u{200B}\u{200C}\u{200D}\u{2060}\u{FEFF}\n\t"));
        assert!(is_blank(""));
        assert!(!is_blank("\u{200B}a"));
        assert!(!is_blank("👨\u{200D}👩"));
        assert!(
            is_blank("\u{202E}\u{200F}\u{2066}"),
            "bidirectional controls alone"
        );
    }

    #[test]
    fn titles_stay_on_one_line() {
        assert_eq!(
            one_line(" a\u{0}b\u{1b}[31mc\r\nd\u{85}e "),
            "a b [31mc  d e"
        );
        assert_eq!(one_line("plain ✓ title"), "plain ✓ title");
        assert_eq!(one_line("\n\t"), "");
        // Read as typed: no override reverses it, no isolate spills out of it.
        assert_eq!(
            one_line("\u{202E}evil\u{202C} title \u{2067}x\u{2069}"),
            "evil title x"
        );
        assert_eq!(
            one_line("שלום (C++)\u{200F}"),
            "שלום (C++)\u{200F}",
            "marks stay"
        );
        assert_eq!(
            one_line("עברית title"),
            "עברית title",
            "right-to-left text stays"
        );
    }
}
