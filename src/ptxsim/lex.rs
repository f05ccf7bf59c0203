//! Tokens of PTX text. Words are maximal runs of identifier characters including the dots
//! of opcodes and directives (`ld.global.nc.v4.f32`, `.reg`, `%tid.x`, `shared::cta`), so
//! the parser sees an instruction's whole opcode as one token.

#[derive(Debug, Clone, PartialEq)]
pub enum Tok {
    /// An identifier, directive, opcode, register or number, as written.
    Word(String),
    /// One punctuation character: `, ; : [ ] { } ( ) + - ! | @ < > =`.
    Punct(char),
    /// A string literal (only in `.pragma` / `.file`), without the quotes.
    Str(String),
}

#[derive(Debug, Clone)]
pub struct Token {
    pub tok: Tok,
    /// 1-based line of the PTX text.
    pub line: u32,
}

fn word_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '$' | '%' | '.')
}

/// Split PTX text into tokens, dropping `//` and `/* */` comments.
pub fn lex(text: &str) -> Result<Vec<Token>, (u32, String)> {
    let mut out = Vec::new();
    let chars: Vec<char> = text.chars().collect();
    let (mut i, mut line) = (0usize, 1u32);
    while i < chars.len() {
        let c = chars[i];
        if c == '\n' {
            line += 1;
            i += 1;
        } else if c.is_whitespace() {
            i += 1;
        } else if c == '/' && chars.get(i + 1) == Some(&'/') {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && chars.get(i + 1) == Some(&'*') {
            i += 2;
            while i < chars.len() && !(chars[i] == '*' && chars.get(i + 1) == Some(&'/')) {
                if chars[i] == '\n' {
                    line += 1;
                }
                i += 1;
            }
            i += 2;
        } else if c == '"' {
            let start = i + 1;
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                i += 1;
            }
            if i >= chars.len() {
                return Err((line, "unterminated string".into()));
            }
            out.push(Token {
                tok: Tok::Str(chars[start..i].iter().collect()),
                line,
            });
            i += 1;
        } else if word_char(c) {
            let start = i;
            while i < chars.len() {
                if word_char(chars[i]) {
                    i += 1;
                } else if chars[i] == ':' && chars.get(i + 1) == Some(&':') {
                    // state-space qualifiers such as `.shared::cta`
                    i += 2;
                } else {
                    break;
                }
            }
            out.push(Token {
                tok: Tok::Word(chars[start..i].iter().collect()),
                line,
            });
        } else if ",;:[]{}()+-!|@<>=".contains(c) {
            out.push(Token {
                tok: Tok::Punct(c),
                line,
            });
            i += 1;
        } else {
            return Err((line, format!("unexpected character `{c}`")));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_keep_dotted_opcodes_and_qualifiers() {
        let t = lex("ld.shared::cta.v2.f32 {%f1, %f2}, [%r3+-8]; // c\n$L__BB0_2:").unwrap();
        let words: Vec<String> = t
            .iter()
            .map(|t| match &t.tok {
                Tok::Word(w) => w.clone(),
                Tok::Punct(c) => c.to_string(),
                Tok::Str(s) => s.clone(),
            })
            .collect();
        assert_eq!(
            words,
            [
                "ld.shared::cta.v2.f32",
                "{",
                "%f1",
                ",",
                "%f2",
                "}",
                ",",
                "[",
                "%r3",
                "+",
                "-",
                "8",
                "]",
                ";",
                "$L__BB0_2",
                ":"
            ]
        );
        assert_eq!(t.last().unwrap().line, 2);
    }
}
