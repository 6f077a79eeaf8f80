// The widget manager loads its icon fonts relative to where requirejs thinks its modules live
// (the page's folder by default, where they are not). Point requirejs at the vendored copy.
(function () {
  var vendor = document.currentScript.src.replace(/[^/]*$/, "") + "vendor/html-manager";
  require.config({ paths: { "@jupyter-widgets": vendor, "@jupyter-widgets/html-manager/dist": vendor } });
})();

// ipywidgets 8 typesets widget labels with MathJax 2's `MathJax.Hub.Queue` whenever `window.MathJax`
// exists; the book loads MathJax 3, which has no Hub, so on a page with math every labelled widget
// failed to render ("Cannot read properties of undefined (reading 'Queue')"). Give whatever object
// `window.MathJax` holds (the config first, MathJax 3 itself once it starts) a Hub whose Queue asks
// MathJax 3 to typeset the element when it is ready.
(function () {
  function typesetLater(job) {
    var element = job && job[2], mj = window.MathJax;
    if (!mj || !mj.startup || !mj.startup.promise) return;  // not started: its first pass typesets the page
    mj.startup.promise.then(function () { return mj.typesetPromise(element ? [element] : undefined); })
      .catch(function (err) { console.warn("MathJax could not typeset a widget:", err); });
  }
  function withHub(mj) {
    if (mj && typeof mj === "object" && !mj.Hub) {
      Object.defineProperty(mj, "Hub", { value: { Queue: typesetLater }, enumerable: false });
    }
    return mj;
  }
  var current = withHub(window.MathJax);
  Object.defineProperty(window, "MathJax", {
    configurable: true,
    get: function () { return current; },
    set: function (value) { current = withHub(value); },
  });
})();
