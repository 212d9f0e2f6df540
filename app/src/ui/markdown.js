// Markdown rendering with marked; raw HTML in the markdown is shown as text.
import { Marked } from "marked";

const escapeHtml = (s) =>
  String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);

const md = new Marked({
  gfm: true,
  renderer: {
    html(token) {
      return escapeHtml(token && typeof token === "object" ? token.text : token);
    },
    link(token) {
      const href = String(token.href || "");
      const text = this.parser.parseInline(token.tokens || []);
      // Only relative links and http(s) links; no javascript: URLs.
      if (!/^(https?:|\.\/|#|[a-z0-9_\-./]+$)/i.test(href)) return text;
      return `<a href="${escapeHtml(href)}" rel="noopener noreferrer">${text}</a>`;
    },
    image(token) {
      return escapeHtml(token.text || "");
    },
  },
});

export function renderMarkdown(text) {
  // A wide table scrolls sideways in a box that the keyboard can reach too.
  return md
    .parse(String(text || ""))
    .replace(/<table>/g, '<div class="table-scroll" tabindex="0"><table>')
    .replace(/<\/table>/g, "</table></div>");
}

export function renderInline(text) {
  return md.parseInline(String(text || ""));
}
