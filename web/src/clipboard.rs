//! What the copy buttons put on the clipboard: the text as shown, without the control
//! characters a page does not show. An answer holding `ESC [ … m` or a BEL would otherwise
//! paste into a terminal as something other than what the user read (a model, or whoever fed
//! it, can write such bytes into a code block that looks like a harmless command).

use leptos::prelude::window;

/// Copies `text`, as shown, to the clipboard.
pub fn copy(text: &str) {
    let _ = window().navigator().clipboard().write_text(&as_shown(text));
}

/// `text` without C0 controls other than tab and line breaks, DEL and C1 controls.
pub fn as_shown(text: &str) -> String {
    text.chars()
        .filter(|&c| matches!(c, '\t' | '\n' | '\r') || !c.is_control())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controls_a_page_does_not_show_are_left_out() {
        assert_eq!(
            as_shown("echo hi\u{1b}[2K\u{1b}]0;x\u{7}\r\nrm -rf ~\u{7f}\u{9b}31m\tdone"),
            "echo hi[2K]0;x\r\nrm -rf ~31m\tdone"
        );
        // What is shown stays, invisible formatting included (the page renders it too).
        assert_eq!(as_shown("naïve 😀 a\u{200d}b"), "naïve 😀 a\u{200d}b");
    }
}
