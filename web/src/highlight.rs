//! Syntax highlighting for code blocks in answers: one small lexer, configured per language
//! family (keywords, comment and string syntax), that marks keywords, literals, types, strings,
//! comments and numbers. A highlighting crate with full grammars (syntect, tree-sitter) costs
//! hundreds of KiB of wasm; this costs a few (`docs/performance.md`, bundle budget), and a code
//! block in a language it does not know is shown plain.

/// How a language family spells the things the lexer marks.
struct Language {
    keywords: &'static [&'static str],
    /// `true`, `null`, `None`…
    literals: &'static [&'static str],
    line_comments: &'static [&'static str],
    block_comment: Option<(&'static str, &'static str)>,
    /// Characters that open (and close) a string.
    quotes: &'static [char],
    /// `"""` and `'''` strings (Python).
    triple_quotes: bool,
    /// A capitalised word is a type (Rust, Java, TypeScript…).
    capitalised_types: bool,
    /// Keywords in any case (SQL).
    ignore_case: bool,
    /// `'x'` is a char literal but `'a` a lifetime (Rust).
    char_literals: bool,
}

const C_LIKE_LITERALS: &[&str] = &["true", "false", "null", "nullptr", "NULL", "undefined"];

/// What every family starts from: no keywords, no comments, `"` and `'` strings.
const PLAIN: Language = Language {
    keywords: &[],
    literals: &[],
    line_comments: &[],
    block_comment: None,
    quotes: &['"', '\''],
    triple_quotes: false,
    capitalised_types: false,
    ignore_case: false,
    char_literals: false,
};

const RUST: Language = Language {
    keywords: &[
        "as", "async", "await", "break", "const", "continue", "crate", "dyn", "else", "enum",
        "extern", "fn", "for", "if", "impl", "in", "let", "loop", "match", "mod", "move", "mut",
        "pub", "ref", "return", "self", "Self", "static", "struct", "super", "trait", "type",
        "unsafe", "use", "where", "while",
    ],
    literals: &["true", "false", "None", "Some", "Ok", "Err"],
    line_comments: &["//"],
    block_comment: Some(("/*", "*/")),
    // `'` is also a lifetime: char literals are recognised separately.
    quotes: &['"'],
    capitalised_types: true,
    char_literals: true,
    ..PLAIN
};

const PYTHON: Language = Language {
    keywords: &[
        "and", "as", "assert", "async", "await", "break", "class", "continue", "def", "del",
        "elif", "else", "except", "finally", "for", "from", "global", "if", "import", "in", "is",
        "lambda", "nonlocal", "not", "or", "pass", "raise", "return", "try", "while", "with",
        "yield", "match", "case", "self",
    ],
    literals: &["True", "False", "None"],
    line_comments: &["#"],
    triple_quotes: true,
    ..PLAIN
};

const JAVASCRIPT: Language = Language {
    keywords: &[
        "async",
        "await",
        "break",
        "case",
        "catch",
        "class",
        "const",
        "continue",
        "default",
        "delete",
        "do",
        "else",
        "export",
        "extends",
        "finally",
        "for",
        "from",
        "function",
        "if",
        "import",
        "in",
        "instanceof",
        "interface",
        "let",
        "new",
        "of",
        "return",
        "static",
        "super",
        "switch",
        "this",
        "throw",
        "try",
        "type",
        "typeof",
        "var",
        "void",
        "while",
        "yield",
        "enum",
        "implements",
        "private",
        "public",
        "protected",
        "readonly",
    ],
    literals: C_LIKE_LITERALS,
    line_comments: &["//"],
    block_comment: Some(("/*", "*/")),
    quotes: &['"', '\'', '`'],
    capitalised_types: true,
    ..PLAIN
};

const C_FAMILY: Language = Language {
    keywords: &[
        "auto",
        "break",
        "case",
        "catch",
        "char",
        "class",
        "const",
        "continue",
        "default",
        "delete",
        "do",
        "double",
        "else",
        "enum",
        "extends",
        "extern",
        "final",
        "float",
        "for",
        "func",
        "go",
        "goto",
        "if",
        "implements",
        "import",
        "include",
        "int",
        "interface",
        "long",
        "namespace",
        "new",
        "package",
        "private",
        "protected",
        "public",
        "return",
        "short",
        "signed",
        "sizeof",
        "static",
        "struct",
        "switch",
        "template",
        "this",
        "throw",
        "throws",
        "try",
        "typedef",
        "typename",
        "union",
        "unsigned",
        "using",
        "var",
        "virtual",
        "void",
        "volatile",
        "while",
        "defer",
        "chan",
        "map",
        "range",
        "select",
        "type",
        "val",
        "fun",
        "override",
        "string",
        "bool",
        "boolean",
        "byte",
        "uint",
        "std",
    ],
    literals: C_LIKE_LITERALS,
    line_comments: &["//"],
    block_comment: Some(("/*", "*/")),
    capitalised_types: true,
    ..PLAIN
};

const SHELL: Language = Language {
    keywords: &[
        "if", "then", "else", "elif", "fi", "for", "while", "until", "do", "done", "case", "esac",
        "in", "function", "return", "export", "local", "readonly", "set", "unset", "echo", "cd",
        "sudo", "exit",
    ],
    literals: &["true", "false"],
    line_comments: &["#"],
    ..PLAIN
};

const SQL: Language = Language {
    keywords: &[
        "select",
        "from",
        "where",
        "and",
        "or",
        "not",
        "insert",
        "into",
        "values",
        "update",
        "set",
        "delete",
        "create",
        "table",
        "index",
        "on",
        "join",
        "left",
        "right",
        "inner",
        "outer",
        "group",
        "by",
        "order",
        "having",
        "limit",
        "offset",
        "as",
        "distinct",
        "union",
        "primary",
        "key",
        "references",
        "foreign",
        "alter",
        "drop",
        "begin",
        "commit",
        "rollback",
        "with",
        "returning",
        "case",
        "when",
        "then",
        "else",
        "end",
        "is",
        "in",
        "exists",
        "default",
        "unique",
        "check",
        "constraint",
        "asc",
        "desc",
        "like",
    ],
    literals: &["null", "true", "false"],
    line_comments: &["--"],
    block_comment: Some(("/*", "*/")),
    quotes: &['\''],
    ignore_case: true,
    ..PLAIN
};

const DATA: Language = Language {
    literals: &["true", "false", "null", "yes", "no", "on", "off"],
    line_comments: &["#"],
    ..PLAIN
};

const CSS: Language = Language {
    keywords: &[
        "important",
        "media",
        "import",
        "from",
        "to",
        "keyframes",
        "supports",
    ],
    block_comment: Some(("/*", "*/")),
    ..PLAIN
};

fn language(name: &str) -> Option<&'static Language> {
    Some(match name.to_ascii_lowercase().as_str() {
        "rust" | "rs" => &RUST,
        "python" | "py" | "python3" => &PYTHON,
        "javascript" | "js" | "jsx" | "typescript" | "ts" | "tsx" | "mjs" | "node" => &JAVASCRIPT,
        "c" | "h" | "cpp" | "c++" | "cc" | "hpp" | "java" | "go" | "golang" | "kotlin" | "kt"
        | "csharp" | "cs" | "c#" | "swift" | "scala" | "dart" | "php" => &C_FAMILY,
        "bash" | "sh" | "shell" | "zsh" | "console" | "dockerfile" => &SHELL,
        "sql" | "postgresql" | "postgres" | "sqlite" | "mysql" => &SQL,
        "json" | "yaml" | "yml" | "toml" | "ini" => &DATA,
        "css" | "scss" => &CSS,
        _ => return None,
    })
}

/// `code` as HTML with highlighting spans (`hl-k` keyword, `hl-l` literal, `hl-t` type, `hl-s`
/// string, `hl-c` comment, `hl-n` number), everything escaped; `None` for a language it does
/// not know.
pub fn highlight(language_name: &str, code: &str) -> Option<String> {
    let language = language(language_name)?;
    let mut out = String::with_capacity(code.len() * 2);
    let mut rest = code;
    while let Some(c) = rest.chars().next() {
        let (class, length) = if let Some(marker) = language
            .line_comments
            .iter()
            .find(|marker| rest.starts_with(**marker))
        {
            let end = rest.find('\n').unwrap_or(rest.len());
            (Some("c"), end.max(marker.len()))
        } else if let Some((open, close)) = language
            .block_comment
            .filter(|(open, _)| rest.starts_with(open))
        {
            let end = rest[open.len()..]
                .find(close)
                .map_or(rest.len(), |at| open.len() + at + close.len());
            (Some("c"), end)
        } else if language.triple_quotes && (rest.starts_with("\"\"\"") || rest.starts_with("'''"))
        {
            let fence = &rest[..3];
            let end = rest[3..].find(fence).map_or(rest.len(), |at| 3 + at + 3);
            (Some("s"), end)
        } else if language.quotes.contains(&c) {
            (Some("s"), string_length(rest, c))
        } else if language.char_literals && c == '\'' {
            match char_literal_length(rest) {
                Some(length) => (Some("s"), length),
                None => (None, 1),
            }
        } else if c.is_ascii_digit() {
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '.'))
                .unwrap_or(rest.len());
            (Some("n"), end)
        } else if c.is_alphabetic() || c == '_' || c == '$' || c == '@' {
            let end = rest
                .char_indices()
                .skip(1)
                .find(|(_, c)| !(c.is_alphanumeric() || *c == '_'))
                .map_or(rest.len(), |(at, _)| at);
            let word = &rest[..end];
            let is = |words: &[&str]| {
                if language.ignore_case {
                    words.iter().any(|w| w.eq_ignore_ascii_case(word))
                } else {
                    words.contains(&word)
                }
            };
            let class = if is(language.keywords) {
                Some("k")
            } else if is(language.literals) {
                Some("l")
            } else if language.capitalised_types
                && word.starts_with(|c: char| c.is_ascii_uppercase())
                && word.chars().any(|c| c.is_ascii_lowercase())
            {
                Some("t")
            } else {
                None
            };
            (class, end)
        } else {
            (None, c.len_utf8())
        };
        let (token, after) = rest.split_at(length.max(c.len_utf8()).min(rest.len()));
        match class {
            Some(class) => {
                out.push_str("<span class=\"hl-");
                out.push_str(class);
                out.push_str("\">");
                escape_into(&mut out, token);
                out.push_str("</span>");
            }
            None => escape_into(&mut out, token),
        }
        rest = after;
    }
    Some(out)
}

/// A string from its opening `quote` to the matching one (escapes skipped), or to the end of
/// the line when it is not closed.
fn string_length(text: &str, quote: char) -> usize {
    let mut chars = text.char_indices().skip(1);
    while let Some((at, c)) = chars.next() {
        match c {
            '\\' => {
                chars.next();
            }
            '\n' if quote != '`' => return at,
            c if c == quote => return at + c.len_utf8(),
            _ => {}
        }
    }
    text.len()
}

/// `'a'` or `'\n'` (a Rust char literal), not `'a` (a lifetime).
fn char_literal_length(text: &str) -> Option<usize> {
    let mut chars = text.char_indices().skip(1);
    let (_, first) = chars.next()?;
    if first == '\\' {
        let (at, _) = chars.find(|(_, c)| *c == '\'')?;
        return (at <= 10).then_some(at + 1);
    }
    let (at, closing) = chars.next()?;
    (closing == '\'').then_some(at + 1)
}

fn escape_into(out: &mut String, text: &str) {
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rust_keywords_strings_comments_numbers_and_types_are_marked() {
        let html = highlight(
            "rust",
            "fn main() { let s: String = \"hi\"; // note\n let n = 42; }",
        )
        .unwrap();
        assert!(html.contains("<span class=\"hl-k\">fn</span>"), "{html}");
        assert!(
            html.contains("<span class=\"hl-t\">String</span>"),
            "{html}"
        );
        assert!(
            html.contains("<span class=\"hl-s\">&quot;hi&quot;</span>"),
            "{html}"
        );
        assert!(
            html.contains("<span class=\"hl-c\">// note</span>\n"),
            "{html}"
        );
        assert!(html.contains("<span class=\"hl-n\">42</span>"), "{html}");
    }

    #[test]
    fn lifetimes_are_not_strings_but_char_literals_are() {
        let html = highlight("rs", "fn f<'a>(x: &'a str) -> char { 'x' }").unwrap();
        assert!(!html.contains("<span class=\"hl-s\">'a"), "{html}");
        assert!(html.contains("<span class=\"hl-s\">'x'</span>"), "{html}");
    }

    #[test]
    fn python_triple_quotes_and_hash_comments() {
        let html = highlight(
            "py",
            "def f():\n    \"\"\"doc\n    more\"\"\"\n    return None  # x",
        )
        .unwrap();
        assert!(html.contains("<span class=\"hl-k\">def</span>"), "{html}");
        assert!(
            html.contains(
                "<span class=\"hl-s\">&quot;&quot;&quot;doc\n    more&quot;&quot;&quot;</span>"
            ),
            "{html}"
        );
        assert!(html.contains("<span class=\"hl-l\">None</span>"), "{html}");
        assert!(html.contains("<span class=\"hl-c\"># x</span>"), "{html}");
    }

    #[test]
    fn sql_keywords_ignore_case() {
        let html = highlight("sql", "SELECT id FROM users -- all").unwrap();
        assert!(
            html.contains("<span class=\"hl-k\">SELECT</span>"),
            "{html}"
        );
        assert!(
            html.contains("<span class=\"hl-c\">-- all</span>"),
            "{html}"
        );
    }

    #[test]
    fn everything_is_escaped_and_nothing_is_lost() {
        let code = "<script>alert('x')</script> & \"q\" é 日本 /* unclosed";
        let html = highlight("js", code).unwrap();
        assert!(!html.contains("<script"), "{html}");
        assert_eq!(text_of(&html), code);
    }

    /// The code a highlighted HTML shows: spans removed, entities decoded.
    fn text_of(html: &str) -> String {
        let mut text = html.to_owned();
        for class in ["k", "s", "c", "t", "l", "n"] {
            text = text.replace(&format!("<span class=\"hl-{class}\">"), "");
        }
        text.replace("</span>", "")
            .replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&quot;", "\"")
            .replace("&amp;", "&")
    }

    #[test]
    fn unknown_languages_are_left_plain() {
        assert_eq!(highlight("brainfuck", "+++"), None);
    }

    proptest::proptest! {
        #[test]
        fn any_code_in_any_language_round_trips(
            code in "\\PC{0,80}",
            lang in proptest::sample::select(vec!["rust", "py", "js", "c", "sh", "sql", "json", "css"]),
        ) {
            let html = highlight(lang, &code).unwrap();
            proptest::prop_assert_eq!(text_of(&html), code);
        }
    }
}
