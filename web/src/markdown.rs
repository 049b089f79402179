//! Model output → HTML, safely. Markdown is rendered with pulldown-cmark, but nothing in the
//! output can run: raw HTML is shown as text, link targets other than http(s), mailto and
//! same-site paths are neutralised, and images become links (no request is made on render).
//! Code blocks get a copy button, handled by delegation in the chat view.

use pulldown_cmark::{CodeBlockKind, CowStr, Event, LinkType, Options, Parser, Tag, TagEnd, html};

/// True when the page's address asks for `render=full`: the streaming answer then re-renders
/// whole on every update, as before [`Incremental`] (for measuring; see `docs/performance.md`).
pub fn full_render_requested() -> bool {
    thread_local! {
        static FULL: bool = web_sys::window()
            .and_then(|window| window.location().search().ok())
            .is_some_and(|search| search.contains("render=full"));
    }
    FULL.with(|full| *full)
}

fn options() -> Options {
    Options::ENABLE_TABLES | Options::ENABLE_STRIKETHROUGH | Options::ENABLE_TASKLISTS
}

/// Markdown that grows at its end (an answer being streamed), rendered so that each update
/// re-renders only its unfinished tail. Appending text can extend or reinterpret only the last
/// blocks (a paragraph becoming a setext heading or a table, a list growing, a code fence
/// closing); the blocks before a blank line followed by a complete line of a new block are
/// final ([`settle_point`]), so their HTML is produced once and kept. The one thing it gives up
/// until the answer completes (when the whole text renders once): a link reference definition
/// applies only to the text rendered with it.
#[derive(Debug, Default)]
pub struct Incremental {
    /// Bytes of the text whose blocks are final (already handed out as finished HTML).
    settled: usize,
}

/// What changed since the last update.
#[derive(Debug, PartialEq)]
pub struct Update {
    /// HTML of blocks that became final since the last update, if any.
    pub finished: Option<String>,
    /// HTML of the unfinished tail.
    pub tail: String,
}

impl Incremental {
    /// Takes the whole text streamed so far (the previous text plus what arrived). A text
    /// shorter than what was settled means a new answer: start over.
    pub fn update(&mut self, text: &str) -> Update {
        if text.len() < self.settled || !text.is_char_boundary(self.settled) {
            self.settled = 0;
        }
        let rest = &text[self.settled..];
        let finished = match settle_point(rest) {
            Some(last) if last > 0 => {
                self.settled += last;
                Some(render(&rest[..last]))
            }
            _ => None,
        };
        Update {
            finished,
            tail: render(&text[self.settled..]),
        }
    }
}

/// Where the text can be cut so that everything before the cut is final, as a byte offset:
/// the start of the line of the last top-level block that
/// - follows a blank line (nothing after a blank line continues a table, a paragraph or a
///   block quote; a list it would continue stays one block), and
/// - has its first line complete (`2` may still become `2. item`, continuing a list above).
fn settle_point(text: &str) -> Option<usize> {
    let mut depth = 0usize;
    let mut point = None;
    for (event, range) in Parser::new_ext(text, options()).into_offset_iter() {
        let starts = match event {
            Event::Start(_) => {
                depth += 1;
                depth == 1
            }
            Event::End(_) => {
                depth = depth.saturating_sub(1);
                false
            }
            // Leaf blocks without a start and end of their own.
            Event::Rule => depth == 0,
            _ => false,
        };
        if !starts {
            continue;
        }
        // The whole line: an indented code block's range starts after its indentation.
        let line = text[..range.start]
            .rfind('\n')
            .map_or(0, |newline| newline + 1);
        if line == 0 || !text[line..].contains('\n') {
            continue;
        }
        let previous = text[..line - 1].rsplit('\n').next().unwrap_or_default();
        if previous.trim().is_empty() {
            point = Some(line);
        }
    }
    point
}

/// Renders `text` as HTML that is safe to assign to `innerHTML`.
pub fn render(text: &str) -> String {
    let mut events = Vec::new();
    let mut in_image = false;
    // Inside a code block: its language and text so far (highlighted as a whole at its end).
    let mut code: Option<(String, String)> = None;
    for event in Parser::new_ext(text, options()) {
        match event {
            // Raw HTML is text: `<script>` shows as `<script>`.
            Event::Html(raw) | Event::InlineHtml(raw) => events.push(Event::Text(raw)),
            Event::Start(Tag::Link {
                link_type,
                dest_url,
                title,
                id,
            }) => events.push(Event::Start(Tag::Link {
                link_type,
                dest_url: safe_url(dest_url),
                title,
                id,
            })),
            Event::Start(Tag::Image {
                dest_url,
                title,
                id,
                ..
            }) => {
                // An image would be fetched as soon as it renders; show it as a link instead.
                in_image = true;
                events.push(Event::Start(Tag::Link {
                    link_type: LinkType::Inline,
                    dest_url: safe_url(dest_url),
                    title,
                    id,
                }));
            }
            Event::End(TagEnd::Image) if in_image => {
                in_image = false;
                events.push(Event::End(TagEnd::Link));
            }
            Event::Start(Tag::CodeBlock(kind)) => {
                let language = match &kind {
                    CodeBlockKind::Fenced(info) => info.split_whitespace().next().unwrap_or(""),
                    CodeBlockKind::Indented => "",
                };
                let mut open = String::from(
                    "<div class=\"code\"><button type=\"button\" class=\"copy\" \
                     aria-label=\"Copy code\">Copy</button><pre><code",
                );
                if !language.is_empty() {
                    open.push_str(" class=\"language-");
                    open.push_str(&escape_attribute(language));
                    open.push('"');
                }
                open.push('>');
                events.push(Event::Html(CowStr::from(open)));
                code = Some((language.to_owned(), String::new()));
            }
            Event::Text(text) if code.is_some() => {
                if let Some((_, body)) = &mut code {
                    body.push_str(&text);
                }
            }
            Event::End(TagEnd::CodeBlock) => {
                if let Some((language, body)) = code.take() {
                    match crate::highlight::highlight(&language, &body) {
                        Some(html) => events.push(Event::Html(CowStr::from(html))),
                        None => events.push(Event::Text(CowStr::from(body))),
                    }
                }
                events.push(Event::Html(CowStr::from("</code></pre></div>\n")));
            }
            other => events.push(other),
        }
    }
    let mut out = String::with_capacity(text.len() * 3 / 2);
    html::push_html(&mut out, events.into_iter());
    // Links open in a new tab, without giving it a handle on this one.
    out.replace(
        "<a href=",
        "<a rel=\"noopener noreferrer nofollow\" target=\"_blank\" href=",
    )
}

/// Keeps web and mail links and same-site paths; anything else (`javascript:`, `data:`…) is
/// replaced by a harmless anchor.
fn safe_url(url: CowStr<'_>) -> CowStr<'_> {
    let lowered = url.trim().to_ascii_lowercase();
    let allowed = lowered.starts_with("https://")
        || lowered.starts_with("http://")
        || lowered.starts_with("mailto:")
        || lowered.starts_with('#')
        || (lowered.starts_with('/') && !lowered.starts_with("//"));
    if allowed { url } else { CowStr::from("#") }
}

fn escape_attribute(value: &str) -> String {
    value
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '+' | '#' | '.'))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markdown_renders() {
        let html = render("# Title\n\nSome **bold** and `code`.\n\n- a\n- b\n");
        assert!(html.contains("<h1>Title</h1>"));
        assert!(html.contains("<strong>bold</strong>"));
        assert!(html.contains("<code>code</code>"));
        assert!(html.contains("<li>a</li>"));
    }

    #[test]
    fn raw_html_is_text_and_never_markup() {
        let html = render("<img src=x onerror=alert(1)>\n\nhi <script>alert(2)</script> there");
        assert!(!html.contains("<img"), "{html}");
        assert!(!html.contains("<script"), "{html}");
        assert!(
            html.contains("&lt;img src=x onerror=alert(1)&gt;"),
            "{html}"
        );
        assert!(
            html.contains("&lt;script&gt;alert(2)&lt;/script&gt;"),
            "{html}"
        );
    }

    #[test]
    fn dangerous_links_and_images_are_neutralised() {
        let html = render(
            "[click](javascript:alert(1)) [data](data:text/html,x) [ok](https://example.com)",
        );
        assert!(!html.contains("javascript:"), "{html}");
        assert!(!html.contains("data:text"), "{html}");
        assert!(html.contains("href=\"https://example.com\""), "{html}");
        assert!(
            html.contains("rel=\"noopener noreferrer nofollow\""),
            "{html}"
        );
        let image = render("![pic](https://example.com/a.png \"t\")");
        assert!(!image.contains("<img"), "{image}");
        assert!(
            image.contains("href=\"https://example.com/a.png\""),
            "{image}"
        );
    }

    #[test]
    fn code_blocks_get_a_copy_button_and_escaped_content() {
        let html = render("```rust\nlet x = \"<b>\";\n```\n");
        assert!(
            html.contains("<button type=\"button\" class=\"copy\""),
            "{html}"
        );
        assert!(html.contains("class=\"language-rust\""), "{html}");
        // Highlighted (a language it knows), and still escaped.
        assert!(
            html.contains("<span class=\"hl-k\">let</span> x = <span class=\"hl-s\">&quot;&lt;b&gt;&quot;</span>;"),
            "{html}"
        );
        let plain = render("```brainfuck\n<b>+\n```\n");
        assert!(plain.contains("&lt;b&gt;+"), "{plain}");
        let sneaky = render("```\"><script>\nx\n```\n");
        assert!(!sneaky.contains("<script"), "{sneaky}");
    }

    #[test]
    fn unfinished_markdown_while_streaming_is_still_safe() {
        let html = render("```py\nprint('half");
        assert!(html.contains("print("), "{html}");
        assert!(html.ends_with("</code></pre></div>\n"), "{html}");
    }

    /// Streams `text` cut at `cuts` through [`Incremental`]: the finished pieces and the last
    /// tail, joined, as the page shows them.
    fn streamed(text: &str, cuts: &[usize]) -> (String, usize) {
        let mut incremental = Incremental::default();
        let mut shown = String::new();
        let mut settles = 0;
        let mut tail = String::new();
        let mut ends: Vec<usize> = cuts
            .iter()
            .map(|cut| cut % (text.len() + 1))
            .filter(|cut| text.is_char_boundary(*cut))
            .collect();
        ends.sort_unstable();
        ends.push(text.len());
        for end in ends {
            let update = incremental.update(&text[..end]);
            if let Some(finished) = update.finished {
                shown.push_str(&finished);
                settles += 1;
            }
            tail = update.tail;
        }
        shown.push_str(&tail);
        (shown, settles)
    }

    #[test]
    fn a_streamed_answer_keeps_its_finished_blocks_and_renders_as_a_whole() {
        let text = "# Plan\n\nFirst paragraph with **bold**.\n\n- one\n- two\n\n```rust\nfn main() {}\n\nlet x = 1;\n```\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\nLast words";
        let cuts: Vec<usize> = (0..text.len()).collect();
        let (shown, settles) = streamed(text, &cuts);
        assert_eq!(shown, render(text));
        // Heading, paragraph, list and code each settled once the next block's first line was
        // complete; the table waits for the last line, which never ends.
        assert_eq!(settles, 4);
    }

    #[test]
    fn an_unclosed_fence_stays_in_the_tail() {
        let mut incremental = Incremental::default();
        let update = incremental.update("Intro\n\n```\nline\n\nmore");
        assert_eq!(update.finished.as_deref(), Some("<p>Intro</p>\n"));
        assert!(update.tail.contains("line\n\nmore"), "{}", update.tail);
        // The fence swallows the blank line: nothing after it is final yet.
        let update = incremental.update("Intro\n\n```\nline\n\nmore\n\nstill code");
        assert_eq!(update.finished, None);
    }

    #[test]
    fn a_shorter_text_starts_over() {
        let mut incremental = Incremental::default();
        incremental.update("one\n\ntwo\n\nthree");
        let update = incremental.update("new");
        assert_eq!(update.tail, "<p>new</p>\n");
    }

    proptest::proptest! {
        #[test]
        fn streaming_in_any_pieces_shows_what_rendering_the_whole_shows(
            blocks in proptest::collection::vec(
                proptest::sample::select(vec![
                    "Some words *and* more", "# Heading", "Setext\n===", "- a\n- b",
                    "1. one\n2. two", "- loose\n\n- list", "> quoted\n> text", "---",
                    "```\ncode\n\nblock\n```", "    indented code", "| h |\n|---|\n| c |",
                    "text\n---", "[link](https://example.com) é ü", "<b>raw</b>",
                    "1. first\n\n12. second", "| x |\n|---|", "| y |", "  - nested\n\n    more",
                ]),
                1..12,
            ),
            separators in proptest::collection::vec(
                proptest::sample::select(vec!["\n\n", "\n", "\n\n\n"]), 12),
            cuts in proptest::collection::vec(0usize..400, 0..20),
        ) {
            let mut text = String::new();
            for (index, block) in blocks.iter().enumerate() {
                if index > 0 {
                    text.push_str(separators[index]);
                }
                text.push_str(block);
            }
            let (shown, _) = streamed(&text, &cuts);
            proptest::prop_assert_eq!(shown, render(&text), "text: {:?}", text);
        }
    }
}
