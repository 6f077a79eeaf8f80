// The widget manager loads its icon fonts relative to where requirejs thinks its modules live
// (the page's folder by default, where they are not). Point requirejs at the vendored copy.
(function () {
  var vendor = document.currentScript.src.replace(/[^/]*$/, "") + "vendor/html-manager";
  require.config({ paths: { "@jupyter-widgets": vendor, "@jupyter-widgets/html-manager/dist": vendor } });
})();
