pub mod c_api;
pub mod config_json;
pub mod model_load;
pub mod safetensors;
pub mod yaml;
