// The migrations are compiled into the binary (`sqlx::migrate!`): build again when one is added.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
