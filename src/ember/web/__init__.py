"""The built-in web page: static files (index.html, style.css, js/*.js ES modules, vendor/ libraries from npm
with their licenses), served by ember.api.web. Nothing here is built at install time."""
