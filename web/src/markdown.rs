//! Model output → HTML, safely. Markdown is rendered with pulldown-cmark, but nothing in the
//! output can run: raw HTML is shown as text, link targets other than http(s), mailto and
//! same-site paths are neutralised, and images become links (no request is made on render).
//! Code blocks get a copy button, handled by delegation in the chat view.

use pulldown_cmark::{CodeBlockKind, CowStr, Event, LinkType, Options, Parser, Tag, TagEnd, html};

/// Renders `text` as HTML that is safe to assign to `innerHTML`.
pub fn render(text: &str) -> String {
    let options =
        Options::ENABLE_TABLES | Options::ENABLE_STRIKETHROUGH | Options::ENABLE_TASKLISTS;
    let mut events = Vec::new();
    let mut in_image = false;
    for event in Parser::new_ext(text, options) {
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
            }
            Event::End(TagEnd::CodeBlock) => {
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
        assert!(html.contains("let x = \"&lt;b&gt;\";"), "{html}");
        let sneaky = render("```\"><script>\nx\n```\n");
        assert!(!sneaky.contains("<script"), "{sneaky}");
    }

    #[test]
    fn unfinished_markdown_while_streaming_is_still_safe() {
        let html = render("```py\nprint('half");
        assert!(html.contains("print("), "{html}");
        assert!(html.ends_with("</code></pre></div>\n"), "{html}");
    }
}
