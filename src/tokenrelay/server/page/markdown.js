// Markdown to DOM nodes, safely: nothing from the model is ever parsed as HTML. Every
// character of the source goes into exactly one text node, in order, so an element's
// textContent is exactly the source text; markdown's own markers ("**", "# ", "```") are
// kept in <span class="mk"> elements that the stylesheet hides.
//
// Blocks, line by line: fenced code, headings, lists, quotes, rules, blank lines,
// paragraphs. Inline: `code`, **strong**, __strong__, *em*, _em_, ~~del~~, [text](url) and
// bare http(s) links.

const INLINE = new RegExp(
  [
    "(`+)([^`]|[^`][\\s\\S]*?[^`])\\1(?!`)", // 1, 2: code
    "\\*\\*(?=\\S)([\\s\\S]*?\\S)\\*\\*", // 3: strong
    "(?<!\\w)__(?=\\S)([\\s\\S]*?\\S)__(?!\\w)", // 4: strong
    "\\*(?=[^\\s*])([\\s\\S]*?[^\\s*])\\*(?!\\*)", // 5: em
    "(?<!\\w)_(?=[^\\s_])([\\s\\S]*?[^\\s_])_(?!\\w)", // 6: em
    "~~(?=\\S)([\\s\\S]*?\\S)~~", // 7: del
    "\\[([^\\]\\n]+)\\]\\((https?:\\/\\/[^\\s()]+)\\)", // 8, 9: link
    "(https?:\\/\\/[^\\s<>()\"']*[^\\s<>()\"'.,;:!?])", // 10: bare link
  ].join("|"),
  "g",
);

const FENCE = /^( {0,3})(`{3,}|~{3,})(.*)$/;
const RULE = /^ {0,3}([-*_])( *\1){2,} *$/;
const HEADING = /^( {0,3}#{1,6})( +)(.*)$/;
const BULLET = /^( *)([-*+])( +)(.*)$/;
const ORDERED = /^( *)(\d{1,9}[.)])( +)(.*)$/;
const QUOTE = /^( {0,3}> ?)(.*)$/;

function el(tag, className) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  return node;
}

/** A hidden marker: part of the text, not of what is shown. */
function mk(text) {
  const span = el("span", "mk");
  span.textContent = text;
  return span;
}

/** A link target from model text: only absolute http(s) URLs, anything else is no link. */
function safeHref(url) {
  try {
    const parsed = new URL(url);
    return parsed.protocol === "http:" || parsed.protocol === "https:" ? parsed.href : null;
  } catch {
    return null;
  }
}

function link(href, children) {
  const a = el("a");
  a.href = href;
  a.rel = "noopener noreferrer nofollow";
  a.target = "_blank";
  a.append(...children);
  return a;
}

/** Inline markdown of one line, as nodes. */
export function inline(text) {
  const nodes = [];
  let at = 0;
  INLINE.lastIndex = 0;
  for (let m = INLINE.exec(text); m !== null; m = INLINE.exec(text)) {
    if (m.index > at) nodes.push(document.createTextNode(text.slice(at, m.index)));
    at = m.index + m[0].length;
    const [whole] = m;
    if (m[1] !== undefined) {
      const code = el("code");
      code.textContent = m[2];
      nodes.push(mk(m[1]), code, mk(m[1]));
    } else if (m[3] !== undefined || m[4] !== undefined) {
      const strong = el("strong");
      strong.append(...inline(m[3] ?? m[4]));
      const marker = whole.slice(0, 2);
      nodes.push(mk(marker), strong, mk(marker));
    } else if (m[5] !== undefined || m[6] !== undefined) {
      const em = el("em");
      em.append(...inline(m[5] ?? m[6]));
      const marker = whole.slice(0, 1);
      nodes.push(mk(marker), em, mk(marker));
    } else if (m[7] !== undefined) {
      const del = el("del");
      del.append(...inline(m[7]));
      nodes.push(mk("~~"), del, mk("~~"));
    } else if (m[8] !== undefined) {
      const href = safeHref(m[9]);
      if (href === null) {
        nodes.push(document.createTextNode(whole));
      } else {
        nodes.push(mk("["), link(href, inline(m[8])), mk(`](${m[9]})`));
      }
    } else {
      const href = safeHref(m[10]);
      nodes.push(href === null ? document.createTextNode(whole) : link(href, [m[10]]));
    }
    INLINE.lastIndex = at; // the recursive calls above reset it
  }
  if (at < text.length) nodes.push(document.createTextNode(text.slice(at)));
  return nodes;
}

function block(className, ...children) {
  const node = el("div", className);
  node.append(...children);
  return node;
}

/** Render markdown `text` as the children of `target` (replacing what was there). */
export function renderMarkdown(text, target) {
  const out = [];
  if (text === "") {
    target.replaceChildren();
    return;
  }
  let code = null; // the open fenced block: {pre, fence}
  for (const raw of text.split(/(?<=\n)/)) {
    const nl = raw.endsWith("\n") ? "\n" : "";
    const line = nl ? raw.slice(0, -1) : raw;
    if (code !== null) {
      const close = FENCE.exec(line);
      if (close && close[2].startsWith(code.fence) && close[3].trim() === "") {
        // The code's last newline goes with the hidden fence: no empty last line is shown.
        const last = code.pre.lastChild;
        let hidden = raw;
        if (last !== null && last.data.endsWith("\n")) {
          last.data = last.data.slice(0, -1);
          hidden = "\n" + raw;
        }
        code.node.append(mk(hidden));
        code = null;
      } else {
        code.pre.append(raw);
      }
      continue;
    }
    let m = FENCE.exec(line);
    if (m && !(m[2][0] === "`" && m[3].includes("`"))) {
      const node = el("div", "code-block");
      const lang = m[3].trim().split(/\s/)[0];
      if (lang) node.dataset.lang = lang.slice(0, 32);
      const pre = el("pre");
      node.append(mk(raw), pre);
      code = { node, pre, fence: m[2] };
      out.push(node);
      continue;
    }
    if (RULE.test(line)) {
      out.push(block("rule", mk(raw)));
    } else if ((m = HEADING.exec(line))) {
      const level = m[1].trim().length;
      out.push(block(`h h${level}`, mk(m[1] + m[2]), ...inline(m[3]), mk(nl)));
    } else if ((m = BULLET.exec(line))) {
      const item = block("li bullet", mk(m[1] + m[2] + m[3]), ...inline(m[4]), mk(nl));
      item.dataset.depth = String(Math.min(Math.floor(m[1].length / 2), 4));
      out.push(item);
    } else if ((m = ORDERED.exec(line))) {
      const number = el("span", "num");
      number.textContent = m[2];
      const item = block("li ordered", mk(m[1]), number, m[3], ...inline(m[4]), mk(nl));
      item.dataset.depth = String(Math.min(Math.floor(m[1].length / 2), 4));
      out.push(item);
    } else if ((m = QUOTE.exec(line))) {
      out.push(block("quote", mk(m[1]), ...inline(m[2]), mk(nl)));
    } else if (line.trim() === "") {
      out.push(block("blank", mk(raw)));
    } else {
      out.push(block("p", ...inline(line), mk(nl)));
    }
  }
  target.replaceChildren(...out);
}
