//! The model's own chat template (Jinja), rendered the way `transformers` does.
//!
//! Templates are written for Python's Jinja2 as `transformers` configures it:
//! `trim_blocks` and `lstrip_blocks` on, Python string methods (`.strip()`),
//! `raise_exception(...)`, `bos_token`/`eos_token` and a `tojson` that
//! formats like `json.dumps`. The template is compiled once, at load.

use std::fmt::Write as _;

use minijinja::syntax::SyntaxConfig;
use minijinja::value::{Kwargs, ValueKind};
use minijinja::{Environment, Error, ErrorKind, Value, context};
use serde::{Deserialize, Serialize};

use super::TokenizerError;

const NAME: &str = "chat_template";

/// Instructions one render may run. A template comes with the model file and runs for
/// every chat request: a broken one (nested loops) must fail, not stall the worker. Real
/// templates use a few thousand per message; this is tens of thousands of messages, and
/// under a second at worst.
const RENDER_FUEL: u64 = 20_000_000;

/// One message of a chat, as the template sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A compiled chat template with the model's BOS/EOS texts.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

impl ChatTemplate {
    /// Compiles `source`; a syntax error is reported here, not at first use.
    pub fn new(
        source: &str,
        bos_token: Option<&str>,
        eos_token: Option<&str>,
    ) -> Result<Self, TokenizerError> {
        let compile_error = |e: Error| TokenizerError::ChatTemplate(e.to_string());
        let mut env = Environment::new();
        let syntax = SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(compile_error)?;
        env.set_syntax(syntax);
        env.set_fuel(Some(RENDER_FUEL));
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_filter("tojson", tojson);
        env.add_template_owned(NAME, source.to_owned())
            .map_err(compile_error)?;
        Ok(Self {
            env,
            bos_token: bos_token.unwrap_or_default().to_owned(),
            eos_token: eos_token.unwrap_or_default().to_owned(),
        })
    }

    /// The prompt text for `messages`; `add_generation_prompt` appends the
    /// opening of the assistant's turn.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, TokenizerError> {
        let render_error = |e: Error| TokenizerError::Render(e.to_string());
        let messages: Value = messages
            .iter()
            .map(|m| context! { role => m.role.as_str(), content => m.content.as_str() })
            .collect();
        let template = self.env.get_template(NAME).map_err(render_error)?;
        template
            .render(context! {
                messages,
                add_generation_prompt,
                bos_token => self.bos_token.as_str(),
                eos_token => self.eos_token.as_str(),
            })
            .map_err(render_error)
    }
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish_non_exhaustive()
    }
}

/// Templates call this to refuse a chat they cannot format (e.g. roles out of order).
fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// Python's `json.dumps(value, ensure_ascii=False, indent=..., separators=...,
/// sort_keys=...)`, which is what `transformers` registers as `tojson`.
/// (MiniJinja's own `tojson` escapes `<`, `>`, `&` and `'` for HTML.)
fn tojson(value: &Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false);
    let ensure_ascii = kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false);
    let separators: Option<Value> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let (item_sep, key_sep) = match separators {
        Some(pair) => {
            let pair: Vec<String> = pair.try_iter()?.map(|s| s.to_string()).collect();
            match <[String; 2]>::try_from(pair) {
                Ok([item, key]) => (item, key),
                Err(_) => {
                    return Err(Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson separators must be (item_separator, key_separator)",
                    ));
                }
            }
        }
        None => {
            let item = if indent.is_some() { "," } else { ", " };
            (item.to_owned(), ": ".to_owned())
        }
    };
    let mut writer = JsonWriter {
        out: String::new(),
        indent,
        sort_keys,
        ensure_ascii,
        item_sep,
        key_sep,
    };
    writer.value(value, 0)?;
    Ok(Value::from(writer.out))
}

struct JsonWriter {
    out: String,
    indent: Option<usize>,
    sort_keys: bool,
    ensure_ascii: bool,
    item_sep: String,
    key_sep: String,
}

impl JsonWriter {
    fn value(&mut self, value: &Value, depth: usize) -> Result<(), Error> {
        match value.kind() {
            ValueKind::Undefined | ValueKind::None => self.out.push_str("null"),
            ValueKind::Bool => self
                .out
                .push_str(if value.is_true() { "true" } else { "false" }),
            ValueKind::Number => self.number(value),
            ValueKind::String => self.string(value.as_str().unwrap_or_default()),
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<Value> = value.try_iter()?.collect();
                self.container(('[', ']'), items.len(), depth, |w, i| {
                    w.value(&items[i], depth + 1)
                })?;
            }
            ValueKind::Map => {
                let mut entries = Vec::new();
                for key in value.try_iter()? {
                    let item = value.get_item(&key)?;
                    let key = key.as_str().map_or_else(|| key.to_string(), str::to_owned);
                    entries.push((key, item));
                }
                if self.sort_keys {
                    entries.sort_by(|a, b| a.0.cmp(&b.0));
                }
                self.container(('{', '}'), entries.len(), depth, |w, i| {
                    w.string(&entries[i].0);
                    let sep = w.key_sep.clone();
                    w.out.push_str(&sep);
                    w.value(&entries[i].1, depth + 1)
                })?;
            }
            ValueKind::Invalid => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    "cannot serialize an invalid value to JSON",
                ));
            }
            _ => self.string(&value.to_string()),
        }
        Ok(())
    }

    fn number(&mut self, value: &Value) {
        match value.as_i64() {
            Some(i) => {
                let _ = write!(self.out, "{i}");
            }
            None => match f64::try_from(value.clone()) {
                Ok(f) if f.is_nan() => self.out.push_str("NaN"),
                Ok(f) if f.is_infinite() => {
                    self.out
                        .push_str(if f > 0.0 { "Infinity" } else { "-Infinity" })
                }
                _ => {
                    let _ = write!(self.out, "{value}");
                }
            },
        }
    }

    fn container(
        &mut self,
        (open, close): (char, char),
        len: usize,
        depth: usize,
        mut item: impl FnMut(&mut Self, usize) -> Result<(), Error>,
    ) -> Result<(), Error> {
        self.out.push(open);
        if len == 0 {
            self.out.push(close);
            return Ok(());
        }
        for i in 0..len {
            if i > 0 {
                let sep = self.item_sep.clone();
                self.out.push_str(&sep);
            }
            self.newline(depth + 1);
            item(self, i)?;
        }
        self.newline(depth);
        self.out.push(close);
        Ok(())
    }

    fn newline(&mut self, depth: usize) {
        if let Some(indent) = self.indent {
            self.out.push('\n');
            self.out.extend(std::iter::repeat_n(' ', indent * depth));
        }
    }

    fn string(&mut self, s: &str) {
        self.out.push('"');
        for c in s.chars() {
            match c {
                '"' => self.out.push_str("\\\""),
                '\\' => self.out.push_str("\\\\"),
                '\n' => self.out.push_str("\\n"),
                '\r' => self.out.push_str("\\r"),
                '\t' => self.out.push_str("\\t"),
                '\u{8}' => self.out.push_str("\\b"),
                '\u{c}' => self.out.push_str("\\f"),
                c if (c as u32) < 0x20 || (self.ensure_ascii && !c.is_ascii()) => {
                    let mut units = [0u16; 2];
                    for unit in c.encode_utf16(&mut units) {
                        let _ = write!(self.out, "\\u{unit:04x}");
                    }
                }
                c => self.out.push(c),
            }
        }
        self.out.push('"');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render_one(source: &str, messages: &[ChatMessage]) -> Result<String, TokenizerError> {
        ChatTemplate::new(source, Some("<s>"), Some("</s>"))?.render(messages, true)
    }

    #[test]
    fn a_runaway_template_fails_instead_of_stalling() {
        // 10^12 iterations: without a fuel limit this would run for a day.
        let source = "{% for a in range(10000) %}{% for b in range(10000) %}\
                      {% for c in range(10000) %}x{% endfor %}{% endfor %}{% endfor %}";
        let started = std::time::Instant::now();
        let err = render_one(source, &[ChatMessage::new("user", "hi")]).unwrap_err();
        assert!(err.to_string().contains("fuel"), "{err}");
        assert!(started.elapsed() < std::time::Duration::from_secs(30));
    }

    #[test]
    fn blocks_trim_like_transformers() {
        let source = "{% for m in messages %}\n  {% if m.role == 'user' %}\n[{{ m.content }}]\n  {% endif %}\n{% endfor %}";
        let out = render_one(source, &[ChatMessage::new("user", "hi")]).unwrap();
        assert_eq!(out, "[hi]\n");
    }

    #[test]
    fn python_string_methods_and_special_token_variables_work() {
        let source = "{{ bos_token }}{{ messages[0]['content'].strip().upper() }}{{ eos_token }}\
                      {% if add_generation_prompt %}!{% endif %}";
        let out = render_one(source, &[ChatMessage::new("user", "  hi  ")]).unwrap();
        assert_eq!(out, "<s>HI</s>!");
    }

    #[test]
    fn raise_exception_reports_the_templates_message() {
        let source = "{% if messages[0].role != 'system' %}{{ raise_exception('System first, please') }}{% endif %}";
        let err = render_one(source, &[ChatMessage::new("user", "hi")]).unwrap_err();
        assert!(matches!(err, TokenizerError::Render(_)));
        assert!(err.to_string().contains("System first, please"), "{err}");
    }

    #[test]
    fn syntax_errors_surface_at_compile_time() {
        let err = ChatTemplate::new("{% for %}", None, None).unwrap_err();
        assert!(matches!(err, TokenizerError::ChatTemplate(_)), "{err}");
    }

    #[test]
    fn tojson_formats_like_python_json_dumps() {
        let env = {
            let mut env = Environment::new();
            env.add_filter("tojson", tojson);
            env
        };
        let render = |src: &str| env.render_str(src, context! {}).unwrap();
        assert_eq!(
            render(
                r#"{{ {"args": [1, 2.5, true, none], "name": "f", "s": "<a&'b\"\n é>"} | tojson }}"#
            ),
            r#"{"args": [1, 2.5, true, null], "name": "f", "s": "<a&'b\"\n é>"}"#
        );
        assert_eq!(
            render(r#"{{ [1, {"a": 2}] | tojson(separators=[",", ":"]) }}"#),
            r#"[1,{"a":2}]"#
        );
        assert_eq!(
            render(r#"{{ {"b": 1, "a": [] } | tojson(indent=2, sort_keys=true) }}"#),
            "{\n  \"a\": [],\n  \"b\": 1\n}"
        );
        assert_eq!(
            render(r#"{{ "é😀" | tojson(ensure_ascii=true) }}"#),
            r#""\u00e9\ud83d\ude00""#
        );
    }
}
