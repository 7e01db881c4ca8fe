// Render math with the vendored KaTeX (docs/assets/katex), offline.
//
// * Markdown pages: pymdownx.arithmatex (generic mode) leaves inline `\( … \)` in span.arithmatex and display
//   `\[ … \]` in div.arithmatex. Only those elements are touched, so a `$` in code is never taken for math.
// * Tutorials (mkdocs-jupyter): notebook markdown cells keep their `$ … $` / `$$ … $$` as text; render those
//   inside rendered-markdown cells only (never inside code cells or outputs).
//
// Material's instant navigation swaps pages without a reload; `document$` fires for every page it shows.
(function () {
  var arithmatex = {
    delimiters: [
      { left: "\\(", right: "\\)", display: false },
      { left: "\\[", right: "\\]", display: true },
    ],
    throwOnError: false,
  };
  var notebook = {
    delimiters: [
      { left: "$$", right: "$$", display: true },
      { left: "$", right: "$", display: false },
      { left: "\\(", right: "\\)", display: false },
      { left: "\\[", right: "\\]", display: true },
    ],
    throwOnError: false,
  };
  function render() {
    if (typeof renderMathInElement === "undefined") return;
    document.querySelectorAll(".arithmatex").forEach(function (el) {
      renderMathInElement(el, arithmatex);
    });
    document.querySelectorAll(".jupyter-wrapper .jp-RenderedMarkdown").forEach(function (el) {
      renderMathInElement(el, notebook);
    });
  }
  if (typeof document$ !== "undefined") {
    document$.subscribe(render);
  } else {
    document.addEventListener("DOMContentLoaded", render);
  }
})();
